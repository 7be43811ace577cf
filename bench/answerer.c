/* The compiled answerer (bench.answerer): a decision service that does no work.

       answerer SOCKET ANSWER

   Listens on the Unix socket SOCKET and answers every request on it, kept alive, once it has
   read it whole (its head, then content-length bytes): `POST /meter...` with 204, anything
   else with the bytes of the file ANSWER (a whole HTTP/1.1 answer, head and body). One
   thread and epoll: the least a service in another process can cost Envoy's exchange, which
   bench.breakdown sets under tollgate's decision service. Prints `ready` once it listens.
   Neither the decide filter nor ext_authz sends a chunked body; one is not read. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_REQUEST (16 << 20)

struct conn { int fd; char *buf; size_t len, cap; };

static const char NO_CONTENT[] = "HTTP/1.1 204 No Content\r\n\r\n";

static int write_all(int fd, const char *data, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, data, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return -1;  /* a peer that does not read its answers is dropped */
    data += w; n -= (size_t)w;
  }
  return 0;
}

/* The content-length of the head buf[0..head), 0 if it has none; -1 if it is not a number. */
static long content_length(const char *buf, size_t head) {
  for (const char *line = buf; line < buf + head;) {
    const char *end = memmem(line, (size_t)(buf + head - line), "\r\n", 2);
    if (end == NULL) break;
    if ((size_t)(end - line) > 15 && strncasecmp(line, "content-length:", 15) == 0) {
      char *stop;
      long n = strtol(line + 15, &stop, 10);
      return n < 0 || stop == line + 15 ? -1 : n;
    }
    line = end + 2;
  }
  return 0;
}

/* Answers every whole request in c's buffer; -1 if the connection is to be closed. */
static int serve(struct conn *c, const char *answer, size_t answer_len) {
  for (;;) {
    char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
    if (end == NULL) return 0;
    size_t head = (size_t)(end - c->buf) + 4;
    long length = content_length(c->buf, head);
    if (length < 0 || head + (size_t)length > MAX_REQUEST) return -1;
    if (c->len < head + (size_t)length) return 0;
    int meter = c->len >= 11 && memcmp(c->buf, "POST /meter", 11) == 0;
    if (write_all(c->fd, meter ? NO_CONTENT : answer, meter ? sizeof NO_CONTENT - 1 : answer_len))
      return -1;
    c->len -= head + (size_t)length;
    memmove(c->buf, c->buf + head + (size_t)length, c->len);
  }
}

static void drop(int epoll, struct conn *c) {
  epoll_ctl(epoll, EPOLL_CTL_DEL, c->fd, NULL);
  close(c->fd);
  free(c->buf);
  free(c);
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s SOCKET ANSWER\n", argv[0]);
    return 2;
  }
  FILE *f = fopen(argv[2], "rb");
  if (f == NULL) { perror(argv[2]); return 1; }
  static char answer[1 << 16];
  size_t answer_len = fread(answer, 1, sizeof answer, f);
  fclose(f);

  struct sockaddr_un address = {.sun_family = AF_UNIX};
  if (strlen(argv[1]) >= sizeof address.sun_path) { fprintf(stderr, "path too long\n"); return 1; }
  strcpy(address.sun_path, argv[1]);
  unlink(argv[1]);
  int listener = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK, 0);
  if (listener < 0 || bind(listener, (struct sockaddr *)&address, sizeof address) != 0
      || listen(listener, 4096) != 0) {
    perror(argv[1]);
    return 1;
  }
  int epoll = epoll_create1(0);
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
  epoll_ctl(epoll, EPOLL_CTL_ADD, listener, &ev);
  printf("ready\n");
  fflush(stdout);

  struct epoll_event events[64];
  for (;;) {
    int n = epoll_wait(epoll, events, 64, -1);
    if (n < 0 && errno == EINTR) continue;
    for (int i = 0; i < n; i++) {
      if (events[i].data.ptr == NULL) {  /* the listener */
        int fd;
        while ((fd = accept4(listener, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
          struct conn *c = calloc(1, sizeof *c);
          c->fd = fd;
          c->cap = 1 << 16;
          c->buf = malloc(c->cap);
          struct epoll_event add = {.events = EPOLLIN, .data.ptr = c};
          epoll_ctl(epoll, EPOLL_CTL_ADD, fd, &add);
        }
        continue;
      }
      struct conn *c = events[i].data.ptr;
      if (c->len == c->cap) {
        if (c->cap >= MAX_REQUEST) { drop(epoll, c); continue; }
        c->cap *= 2;
        c->buf = realloc(c->buf, c->cap);
      }
      ssize_t r = read(c->fd, c->buf + c->len, c->cap - c->len);
      if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
      if (r <= 0) { drop(epoll, c); continue; }
      c->len += (size_t)r;
      if (serve(c, answer, answer_len) != 0) drop(epoll, c);
    }
  }
}

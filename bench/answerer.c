/* The compiled answerer (bench.answerer): a decision service that does no work, or, with
   --store, a model of a compiled decision service doing what tollgate's does that costs most.

       answerer SOCKET ANSWER [--store DATABASE ROW]

   Listens on the Unix socket SOCKET and answers every request on it, kept alive, once it has
   read it whole (its head, then content-length bytes): `POST /meter...` with 204, anything
   else with the bytes of the file ANSWER (a whole HTTP/1.1 answer, head and body). One
   thread and epoll: the least a service in another process can cost Envoy's exchange, which
   bench.breakdown sets under tollgate's decision service. Prints `ready` once it listens.
   Neither the decide filter nor ext_authz sends a chunked body; one is not read.

   --store: ANSWER is a head without its end (the decision's headers), and each decision
   also HMACs the key its client presented (SHA-256, as the key lookup does), takes a new
   request id, reserves its worst case on a budget counter and writes the request ahead
   (the statements of tollgate's SQLite store, in its state file DATABASE, made by the store:
   a reservation transaction, then an in-flight row, ROW with its request id), and asks a
   stream that did not ask for usage for it (the body replaced, as tollgate does); the
   request's last meter post (`x-tollgate-end: 1`) settles it (its in-flight row and hold
   deleted, its ledger row written, its counter charged, in one transaction). tollgate's
   meter filter no longer sends one (Envoy's access log carries a response's end, which this
   does not serve): behind its Envoy nothing is settled, as tollgate settles off the
   answer's path. What it leaves out (the policy, the plan, the prices) costs a compiled
   service microseconds. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/random.h>
#include <unistd.h>

#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <sqlite3.h>

#define MAX_REQUEST (16 << 20)
#define COUNTER "model:budget"
#define AMOUNT 4242
#define COST 21

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

/* The value of header `name` in head buf[0..head), its length in *len; NULL if absent. */
static const char *field(const char *buf, size_t head, const char *name, size_t *len) {
  size_t n = strlen(name);
  for (const char *line = buf; line < buf + head;) {
    const char *end = memmem(line, (size_t)(buf + head - line), "\r\n", 2);
    if (end == NULL) break;
    if ((size_t)(end - line) > n && strncasecmp(line, name, n) == 0 && line[n] == ':') {
      const char *value = line + n + 1;
      while (value < end && *value == ' ') value++;
      *len = (size_t)(end - value);
      return value;
    }
    line = end + 2;
  }
  return NULL;
}

/* The content-length of the head buf[0..head), 0 if it has none; -1 if it is not a number. */
static long content_length(const char *buf, size_t head) {
  size_t len;
  const char *value = field(buf, head, "content-length", &len);
  if (value == NULL) return 0;
  char *stop;
  long n = strtol(value, &stop, 10);
  return n < 0 || stop == value || stop != value + len ? -1 : n;
}

/* --store: the statements, prepared once, and the row written ahead. */
static sqlite3 *db;
static sqlite3_stmt *begin_, *commit_, *counter_, *reserve_, *hold_, *ahead_, *unflight_,
    *unhold_, *ledger_, *charge_;
static char row_template[8192];
static const unsigned char PEPPER[32] = "a pepper of thirty-two bytes ...";

static void prepare(sqlite3_stmt **statement, const char *sql) {
  if (sqlite3_prepare_v3(db, sql, -1, SQLITE_PREPARE_PERSISTENT, statement, NULL) != SQLITE_OK) {
    fprintf(stderr, "%s: %s\n", sql, sqlite3_errmsg(db));
    exit(1);
  }
}

static void run(sqlite3_stmt *statement) {
  int rc;
  while ((rc = sqlite3_step(statement)) == SQLITE_ROW) {}
  if (rc != SQLITE_DONE) {  /* a benchmark's store that fails is a broken benchmark */
    fprintf(stderr, "sqlite: %s\n", sqlite3_errmsg(db));
    exit(1);
  }
  sqlite3_reset(statement);
}

static void open_store(const char *path, const char *row) {
  FILE *f = fopen(row, "rb");
  if (f == NULL) { perror(row); exit(1); }
  row_template[fread(row_template, 1, sizeof row_template - 1, f)] = 0;
  fclose(f);
  if (sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE, NULL) != SQLITE_OK) {
    fprintf(stderr, "%s: %s\n", path, sqlite3_errmsg(db));
    exit(1);
  }
  sqlite3_busy_timeout(db, 10000);
  sqlite3_exec(db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL", NULL, NULL, NULL);
  prepare(&begin_, "BEGIN IMMEDIATE");
  prepare(&commit_, "COMMIT");
  prepare(&counter_, "SELECT spent, reserved FROM budget_counters WHERE counter = ?1");
  prepare(&reserve_, "INSERT INTO budget_counters (counter, reserved) VALUES (?1, ?2) "
          "ON CONFLICT (counter) DO UPDATE SET reserved = reserved + ?2");
  prepare(&hold_, "INSERT OR REPLACE INTO holds (request_id, counter, amount, pid, started) "
          "VALUES (?1, ?2, ?3, ?4, 0)");
  prepare(&ahead_, "INSERT OR REPLACE INTO inflight (request_id, pid, started, row) "
          "VALUES (?1, ?2, 0, ?3)");
  prepare(&unflight_, "DELETE FROM inflight WHERE request_id = ?1");
  prepare(&unhold_, "DELETE FROM holds WHERE request_id = ?1");
  prepare(&ledger_, "INSERT OR IGNORE INTO ledger (request_id, ts, key_id, key_name, org, "
          "provider, model, route, input_tokens, output_tokens, cached_input_tokens, "
          "cache_write_tokens, reasoning_tokens, cost_micros, usage_reported, status, outcome, "
          "latency_ms, fallback_count) VALUES (?1, '2026-12-05T00:00:00.000000+00:00', "
          "'vk_model', 'model', 'acme', 'mp_openai', 'gpt-5-mini', 'chat_completions', 12, 9, "
          "0, 0, 0, ?2, 1, 200, 'completed', 0.3, 0)");
  prepare(&charge_, "INSERT INTO budget_counters (counter, spent) VALUES (?1, ?2) "
          "ON CONFLICT (counter) DO UPDATE SET spent = spent + ?2, "
          "reserved = MAX(0, reserved - ?3)");
}

/* A decision (see --store): its answer written to `fd`. */
static int decide(int fd, const char *buf, size_t head, const char *body, size_t length,
                  const char *answer, size_t answer_len) {
  static unsigned char client[1 << 16];
  size_t encoded_len;
  const char *encoded = field(buf, head, "x-tollgate-head", &encoded_len);
  int decoded = encoded && encoded_len < sizeof client * 3 / 4
      ? EVP_DecodeBlock(client, (const unsigned char *)encoded, (int)encoded_len) : 0;
  client[decoded > 0 ? decoded : 0] = 0;
  const char *bearer = strcasestr((const char *)client, "authorization: Bearer ");
  const char *secret = bearer ? bearer + 22 : "";
  unsigned char mac[32];
  unsigned int mac_len;
  HMAC(EVP_sha256(), PEPPER, sizeof PEPPER, (const unsigned char *)secret,
       strcspn(secret, "\n"), mac, &mac_len);

  unsigned char random[10];
  if (getrandom(random, sizeof random, 0) != sizeof random) return -1;
  char id[32] = "req_";
  for (size_t i = 0; i < sizeof random; i++) sprintf(id + 4 + 2 * i, "%02x", random[i]);

  run(begin_);
  sqlite3_bind_text(counter_, 1, COUNTER, -1, SQLITE_STATIC);
  run(counter_);
  sqlite3_bind_text(reserve_, 1, COUNTER, -1, SQLITE_STATIC);
  sqlite3_bind_int64(reserve_, 2, AMOUNT);
  run(reserve_);
  sqlite3_bind_text(hold_, 1, id, -1, SQLITE_STATIC);
  sqlite3_bind_text(hold_, 2, COUNTER, -1, SQLITE_STATIC);
  sqlite3_bind_int64(hold_, 3, AMOUNT);
  sqlite3_bind_int64(hold_, 4, getpid());
  run(hold_);
  run(commit_);
  static char row[sizeof row_template + 64];
  int row_len = snprintf(row, sizeof row, row_template, id);
  sqlite3_bind_text(ahead_, 1, id, -1, SQLITE_STATIC);
  sqlite3_bind_int64(ahead_, 2, getpid());
  sqlite3_bind_text(ahead_, 3, row, row_len, SQLITE_STATIC);
  run(ahead_);

  static char out[1 << 17];
  int n;
  int streams = memmem(body, length, "\"stream\": true", 14) != NULL
      && memmem(body, length, "include_usage", 13) == NULL && length > 1 && body[0] == '{';
  if (streams) {
    static char asked[1 << 16];
    int asked_len = snprintf(asked, sizeof asked, "{\"stream_options\": {\"include_usage\": "
                             "true}, %.*s", (int)(length - 1), body + 1);
    n = snprintf(out, sizeof out, "%.*sx-tollgate-meta-request_id: %s\r\n"
                 "x-tollgate-set-content-length: %d\r\nx-tollgate-meta-cut_usage: 1\r\n"
                 "x-tollgate-body: replaced\r\ncontent-length: %d\r\n\r\n%s", (int)answer_len,
                 answer, id, asked_len, asked_len, asked);
  } else {
    n = snprintf(out, sizeof out, "%.*sx-tollgate-meta-request_id: %s\r\n"
                 "content-length: 0\r\n\r\n", (int)answer_len, answer, id);
  }
  return n < 0 || (size_t)n >= sizeof out ? -1 : write_all(fd, out, (size_t)n);
}

/* The last meter post of a request (see --store): its settlement. */
static void settle(const char *buf, size_t head) {
  size_t id_len, end_len;
  const char *id = field(buf, head, "x-tollgate-request", &id_len);
  const char *end = field(buf, head, "x-tollgate-end", &end_len);
  if (id == NULL || end == NULL || end_len != 1 || *end != '1') return;
  run(begin_);
  sqlite3_bind_text(unflight_, 1, id, (int)id_len, SQLITE_STATIC);
  run(unflight_);
  sqlite3_bind_text(unhold_, 1, id, (int)id_len, SQLITE_STATIC);
  run(unhold_);
  sqlite3_bind_text(ledger_, 1, id, (int)id_len, SQLITE_STATIC);
  sqlite3_bind_int64(ledger_, 2, COST);
  run(ledger_);
  sqlite3_bind_text(charge_, 1, COUNTER, -1, SQLITE_STATIC);
  sqlite3_bind_int64(charge_, 2, COST);
  sqlite3_bind_int64(charge_, 3, AMOUNT);
  run(charge_);
  run(commit_);
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
    if (meter) {
      if (write_all(c->fd, NO_CONTENT, sizeof NO_CONTENT - 1)) return -1;
      if (db != NULL) settle(c->buf, head);
    } else if (db != NULL) {
      if (decide(c->fd, c->buf, head, c->buf + head, (size_t)length, answer, answer_len))
        return -1;
    } else if (write_all(c->fd, answer, answer_len)) {
      return -1;
    }
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
  if (argc != 3 && !(argc == 6 && strcmp(argv[3], "--store") == 0)) {
    fprintf(stderr, "usage: %s SOCKET ANSWER [--store DATABASE ROW]\n", argv[0]);
    return 2;
  }
  if (argc == 6) open_store(argv[4], argv[5]);
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

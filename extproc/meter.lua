-- tollgate.meter: copies a forwarded request's response, as the provider sent it, to the
-- process that decided the request, which meters and settles it. Nothing is held back, and
-- nothing is sent on the response's own path but for long streams: the bytes since the last
-- post are kept in dynamic metadata (namespace `tollgate.tail`: `n` chunks, base64, under
-- "1" to "n"), and once the response is whole its end goes to that process in Envoy's gRPC
-- access log (`tollgate.response_end`), after the client has had it, marked `end` (base64:
-- the response's head, when no post carried it, then the last bytes of a body of known
-- length, which need no slot of their own), with a stream's first byte time (`first_byte`,
-- microseconds since the epoch) when no post carried it. A post to the decision service
-- (`POST /meter`; extproc/decider.py says what goes there) cost the response some 0.1 ms:
-- the call, and the decision service waking for it while the client was served. Each call
-- into Envoy here costs the response a few microseconds: a JSON answer of one chunk makes
-- as few as it can.
--
-- A long stream is posted in batches (every FLUSH_BYTES or FLUSH_MS), fire-and-forget, so
-- what is kept stays small and a long stream is charged as it goes. A post goes out before
-- the chunk that prompted it, so an SSE stream's first bytes go on to the client at once and
-- wait for the next batch to be posted. Bedrock's event stream posts its head and first
-- bytes at once: its frames are read by its content type, which a stream cut short before
-- its first post would not leave the access log.
--
-- A response that does not end here (the client or the provider reset it, or Envoy answered
-- in the provider's place) leaves no `end`: the same access log takes it to the same
-- process, which charges it all it streamed.
--
-- It also keeps the usage chunk the gateway asked for from a client that did not (the cut,
-- usage_cut.lua, which the renderer puts before this script), once it has copied the bytes,
-- and names the gateway's span on the response (its Trace-Id and Span-Id headers).
local CLUSTER = "@CLUSTER@"
local UPSTREAM = "@UPSTREAM@"
local TRACE_ID, SPAN_ID = "@TRACE_ID@", "@SPAN_ID@" -- the gateway's response headers
local FLUSH_BYTES = 16384
local FLUSH_MS = 250
local TAIL = "tollgate.tail"
local TIER = "x-amzn-bedrock-service-tier"
local OPTIONS = { asynchronous = true, timeout_ms = 5000, send_xff = false,
                  trace_sampled = false }

-- One post of a long stream's bytes (the first begins with the head), fire-and-forget.
local function post(handle, cluster, request_id, seq, first_byte, data)
  handle:httpCall(cluster, {
    [":method"] = "POST", [":path"] = "/meter", [":authority"] = "tollgate",
    ["x-tollgate-request"] = request_id, ["x-tollgate-seq"] = tostring(seq),
    ["x-tollgate-first-byte"] = seq == 0 and first_byte or nil,
  }, data, OPTIONS)
  handle:streamInfo():dynamicMetadata():set("tollgate", "posted", tostring(seq + 1))
end

-- The response's head as the gateway reads it (its status, and the headers that say how to
-- read the body and what it costs): every Envoy API call here is on the response's path.
local function head_of(headers, content_type, length)
  local head = ":status: " .. (headers:get(":status") or "")
  if content_type ~= nil then head = head .. "\ncontent-type: " .. content_type end
  if length ~= nil then head = head .. "\ncontent-length: " .. length end
  local tier = headers:get(TIER)
  if tier ~= nil then head = head .. "\n" .. TIER .. ": " .. tier end
  return head .. "\n\n"
end

-- The decision's request id, the process to post to and whether to cut the usage chunk; nil
-- when the gateway did not forward the request (no decision, or the decision's own reply).
-- Asked only when needed (a post, or a stream that may be cut): the metadata comes as a
-- Lua table made anew on each call, and a JSON answer of known length, most answers, needs
-- none of it (the access log takes its `end` only to a decision's process).
local function decision(handle)
  local decided = handle:streamInfo():dynamicMetadata():get("tollgate")
  if decided == nil or decided["request_id"] == nil or decided["answered"] ~= nil then
    return nil
  end
  local cluster = CLUSTER
  if decided["process"] ~= nil then cluster = CLUSTER .. "_" .. decided["process"] end
  return { request_id = decided["request_id"], cluster = cluster,
           cut = decided["cut_usage"] == "1" }
end

-- The gateway span's ids on the response, read from the `traceparent` the decision sent
-- upstream ("00-<trace id>-<span id>-<flags>"), not from dynamic metadata: each key the
-- decision sets there costs Envoy some 14,000 instructions a request (set, read by a
-- formatter, copied into the access log), and reading both ids here about as much as one.
-- (Envoy's accessor of the request's headers on the response's path is `requestHeaders` in
-- 1.40, to be `downstreamRequestHeaders`.) Whatever goes wrong here is logged, and the
-- response metered all the same.
local request_headers = nil
local function span_headers(handle, headers)
  request_headers = request_headers or handle.downstreamRequestHeaders or handle.requestHeaders
  local parent = request_headers(handle):get("traceparent")
  if parent ~= nil and #parent == 55 then
    headers:replace(TRACE_ID, parent:sub(4, 35))
    headers:replace(SPAN_ID, parent:sub(37, 52))
  end
end

local function name_span(handle, headers)
  local ok, err = pcall(span_headers, handle, headers)
  if not ok then handle:logErr("tollgate.meter: the span's headers: " .. tostring(err)) end
end

local function meter(handle)
  local headers = handle:headers()
  if headers:get(UPSTREAM) == nil then
    -- Envoy's own reply (the access log's): named for the span of a request the gateway
    -- forwarded (a provider unreachable), not of one it never decided.
    if decision(handle) ~= nil then name_span(handle, headers) end
    return
  end
  headers:remove(UPSTREAM)
  name_span(handle, headers)
  local content_type = headers:get("content-type")
  local declared = headers:get("content-length")
  local head = head_of(headers, content_type, declared)
  local lowered = string.lower(content_type or "")
  local frames = string.find(lowered, "application/vnd.amazon.eventstream", 1, true) == 1
  local stream = frames or string.find(lowered, "text/event-stream", 1, true) == 1
  -- A body of known length is whole once that many bytes have come (most JSON answers:
  -- one chunk), and its last bytes go in the report of its end.
  local length = tonumber(declared or "")
  local decided = nil
  if stream or length == nil then
    decided = decision(handle)
    if decided == nil then return end -- not forwarded by the gateway
  end
  -- A usage chunk the gateway asked for is kept from the client (usage_cut.lua): the
  -- client's stream is shorter than a length the provider declared (Envoy sends it in
  -- chunks instead).
  local cutting = stream and not frames and decided.cut
  if cutting and declared ~= nil then headers:remove("content-length") end
  local unfinished = "" -- the cut's: an event not yet whole
  local seq, held, size = 0, { head }, 0
  local since = (stream or length == nil) and handle:timestamp() or nil
  local first_byte = nil -- when a stream's first bytes came (microseconds since the epoch)
  local slots, total, last_bytes = 0, 0, ""
  for chunk in handle:bodyChunks() do
    local n = chunk:length()
    if n > 0 then
      local bytes = chunk:getBytes(0, n)
      if cutting then unfinished = cut_usage(chunk, bytes, unfinished) end
      size, total = size + n, total + n
      if stream and first_byte == nil then
        first_byte = handle:timestampString(EnvoyTimestampResolution.MICROSECOND)
      end
      local last = length ~= nil and total >= length
      if last and not (frames and seq == 0) and size < FLUSH_BYTES then
        last_bytes = bytes
        break
      end
      held[#held + 1] = bytes
      -- Objects taken from the handle are gone once it yields for the next chunk: the
      -- metadata is asked for anew each time.
      local meta = handle:streamInfo():dynamicMetadata()
      local now = handle:timestamp()
      since = since or now
      if (frames and seq == 0) or size >= FLUSH_BYTES or now - since >= FLUSH_MS then
        decided = decided or decision(handle)
        if decided == nil then return end -- not forwarded by the gateway
        post(handle, decided.cluster, decided.request_id, seq, first_byte, table.concat(held))
        seq, held, size, since = seq + 1, {}, 0, now
        if slots > 0 then meta:set(TAIL, "n", 0) end
        slots = 0
      else -- kept for the access log
        slots = slots + 1
        meta:set(TAIL, tostring(slots), handle:base64Escape(bytes))
        meta:set(TAIL, "n", slots)
      end
      if last then break end
    end
  end
  -- Seen to its end: the report says so, with what no post carried of its head and of its
  -- last bytes.
  local meta = handle:streamInfo():dynamicMetadata()
  if seq == 0 and first_byte ~= nil then meta:set(TAIL, "first_byte", first_byte) end
  meta:set(TAIL, "end", handle:base64Escape((seq == 0 and head or "") .. last_bytes))
end

function envoy_on_response(handle)
  local ok, err = pcall(meter, handle)
  if not ok then
    -- Not unsettled: without its `end` the access log charges what it streamed.
    handle:logErr("tollgate.meter: " .. tostring(err))
  end
end

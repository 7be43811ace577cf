-- The usage cut, run by tollgate.meter (meter.lua, which the renderer puts after this): keeps
-- the usage chunk the gateway asked for (`stream_options.include_usage`) out of a
-- chat-completions stream whose client did not ask for it, inside Envoy: no ext_proc round
-- trip per chunk. The meter copies each chunk's bytes, as the provider sent them, before it
-- cuts them. It cuts only responses whose decision set `tollgate.cut_usage` in dynamic
-- metadata, and only event streams. In the meter's own filter, not one of its own: a second
-- Lua filter resumed for every chunk of the stream cost its first byte 0.08 to 0.10 ms.
--
-- Every other byte passes as the provider sent it. Bytes are held only until the event they
-- belong to is complete (providers write whole events, so a stream flows event by event),
-- or until they are too many to be the usage chunk; an event the provider never finished
-- is dropped at the end, as an SSE client would.

local BOUNDARIES = { "\r\n\r\n", "\n\n", "\r\r" }
-- An unfinished event this long cannot be the (small) usage chunk: it is sent on unheld
-- (tollgate.usage.MAX_USAGE_CHUNK_BYTES, which the mitmproxy host uses too).
local MAX_HELD = 65536

-- The end of each whole event of `data`, in turn (an iterator). A boundary is looked for
-- again only once the events have passed where it was last found: looked for from each
-- event's start, a kind the stream does not use (most use one) was looked for to the end
-- of the data again for every event, and a chunk of many events cost its length times
-- their number.
local function event_ends(data)
  local from, starts, ends = 1, {}, {}
  return function()
    local first, last
    for i, boundary in ipairs(BOUNDARIES) do
      local s = starts[i]
      if s == nil or (s and s < from) then
        local e
        s, e = string.find(data, boundary, from, true)
        starts[i], ends[i] = s or false, e
      end
      if s and (first == nil or s < first) then first, last = s, ends[i] end
    end
    if last ~= nil then from = last + 1 end
    return last
  end
end

-- Whether `text` holds `literal` followed by what `after` (a pattern anchored with "^")
-- matches: the literal found plainly, and the pattern tried only where it is. A pattern
-- that is not anchored is tried at every byte: some 100 instructions a byte.
local function followed(text, literal, after)
  local from = 1
  while true do
    local _, last = string.find(text, literal, from, true)
    if last == nil then return false end
    if string.find(text, after, last + 1) ~= nil then return true end
    from = last + 1
  end
end

local SPACE = { [9] = true, [10] = true, [11] = true, [12] = true, [13] = true, [32] = true }
local OPEN, COLON = string.byte("["), string.byte(":")

-- The last byte at or before `at` that is not white space (Lua's %s), or 0.
local function unspaced(text, at)
  while at > 0 and SPACE[string.byte(text, at)] do at = at - 1 end
  return at
end

-- Where `text` holds `"choices"%s*:%s*%[%s*%]`, an empty choices array, at or after
-- `from`: the position of its `]`, or nil. Read back from each `]` (one an event, most
-- often: its choices' end). Every chunk of a stream that may be cut is asked; looking for
-- the pattern itself cost Envoy a third of all it spent on the SDKs' default stream, and
-- the key found plainly (each `"` of the JSON a place to look) nearly half of what a long
-- stream cost it.
local function empty_choices(text, from)
  from = from or 1
  while true do
    local close = string.find(text, "]", from, true)
    if close == nil then return nil end
    local at = unspaced(text, close - 1)
    if string.byte(text, at) == OPEN then
      at = unspaced(text, at - 1)
      if string.byte(text, at) == COLON then
        at = unspaced(text, at - 1)
        if at >= 9 and string.sub(text, at - 8, at) == '"choices"' then return close end
      end
    end
    from = close + 1
  end
end

-- The extra chunk: a JSON object with no choices, only usage.
local function usage_only(event)
  if string.find(event, "^data: ?{") == nil and not followed(event, "\ndata:", "^ ?{") then
    return false
  end
  return empty_choices(event) ~= nil and followed(event, '"usage"', "^%s*:%s*{")
end

-- The complete events of `data` minus the usage-only ones, and the incomplete rest. Only
-- an event that holds an empty choices array (`at`: the first one's `]`, or nil) is looked
-- at; the rest are passed on as runs of events between those cut.
local function cut(data, at)
  local kept, from, run = {}, 1, 1
  for last in event_ends(data) do
    if at ~= nil and at <= last then
      if usage_only(string.sub(data, from, last)) then
        kept[#kept + 1] = string.sub(data, run, from - 1)
        run = last + 1
      end
      at = empty_choices(data, last + 1)
    end
    from = last + 1
  end
  kept[#kept + 1] = string.sub(data, run, from - 1)
  return table.concat(kept), string.sub(data, from)
end

-- `chunk` (whose bytes are `bytes`) less its usage-only events, given the unfinished event
-- the chunks before it left (`rest`); returns the unfinished event it leaves.
local function cut_usage(chunk, bytes, rest)
  local data = rest == "" and bytes or rest .. bytes
  local usage = empty_choices(data)
  -- Most chunks: whole events, none of them without choices: passed on untouched, with no
  -- call into Envoy (each costs the chunk some microseconds).
  if rest == "" and usage == nil then
    local ending = string.sub(bytes, -2)
    if ending == "\n\n" or ending == "\r\r" then return "" end
  end
  local kept
  kept, rest = cut(data, usage)
  if #rest > MAX_HELD then  -- all but what may be the start of its boundary
    kept, rest = kept .. string.sub(rest, 1, -4), string.sub(rest, -3)
  end
  chunk:setBytes(kept)
  return rest
end

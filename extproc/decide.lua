-- tollgate.decide: every request's decision, asked of tollgate's decision service over HTTP
-- (extproc/decider.py says what goes there and back) and applied here (answer.lua): the
-- provider's credentials, path, host and body, the route, and the metadata the filters after
-- it read; or the gateway's own answer. Anything that goes wrong answers an error: a request
-- is never forwarded undecided. The renderer fills in the values below (FILTERS: the version
-- of tollgate's filters, which the decision service checks).
local CLUSTER = "@CLUSTER@"
local MAX_BODY = @MAX_BODY@
local FILTERS = "@FILTERS@"
local TIMEOUT_MS = 5000

-- The client's request head, a "name: value" line each (pseudo-headers too), but what
-- differs on every request and the decision does not read: Envoy's request id, and the
-- body's length (but for a body left unread, refused by it), whose line says only that the
-- client declared one (Envoy read that many bytes: the length stays unless the decision
-- replaces the body). An app's requests then send the same head, which the decision
-- service decodes once.
local function client_head(handle, kind)
  local lines = {}
  for name, value in pairs(handle:headers()) do
    if name == "content-length" and kind ~= "unread" then
      lines[#lines + 1] = "content-length: "
    elseif name ~= "x-request-id" then
      lines[#lines + 1] = name .. ": " .. value
    end
  end
  return table.concat(lines, "\n")
end

local function decide(handle)
  local declared = tonumber(handle:headers():get("content-length") or "")
  local kind, body = "none", ""
  if declared ~= nil and declared > MAX_BODY then
    kind = "unread" -- refused from its headers: the body is not read
  else
    local buffered = handle:body() -- the whole body (yields until it has arrived)
    if buffered ~= nil then
      kind, body = "whole", buffered:getBytes(0, buffered:length())
    end
  end
  -- Handles taken before a yield are gone after it: headers are read from here on. The
  -- body goes as the one string it is: each Lua string past 128 KiB is a fresh mapping of
  -- its own (LuaJIT's allocator), so a head joined to a 1 MiB body cost some 300 page
  -- faults and 0.6 ms more per request.
  local answer, answer_body = handle:httpCall(CLUSTER, {
    [":method"] = "POST", [":path"] = "/decide", [":authority"] = "tollgate",
    ["x-tollgate-body"] = kind, ["x-tollgate-head"] = handle:base64Escape(client_head(handle, kind)),
    ["x-tollgate-filters"] = FILTERS,
  }, body, TIMEOUT_MS)
  if apply_answer(handle, answer, answer_body) then
    handle:clearRouteCache() -- the route follows the provider's cluster the decision set
  end
end

function envoy_on_request(handle)
  or_500(handle, "tollgate.decide", decide)
end

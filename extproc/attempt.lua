-- tollgate.attempt: each attempt of a fallback plan (an upstream filter of the plan's chain
-- cluster, so no other request has it) but the first, whose changes the decision made,
-- asks the decision service of the process that decided the request for the changes that
-- put the provider Envoy chose on it: its credentials, path and host, and its body when it
-- is not the one Envoy replays (answer.lua applies them). The filter before this one has
-- put that provider, from the endpoint's metadata, in a header; the status of the attempt
-- before, which made Envoy retry, is in the request's metadata.
local CLUSTER = "@CLUSTER@"
local PROVIDER = "@PROVIDER@"
local TIMEOUT_MS = 5000

local function attempt(handle)
  local headers = handle:headers()
  local provider = headers:get(PROVIDER) or ""
  headers:remove(PROVIDER)
  local meta = handle:streamInfo():dynamicMetadata()
  local decided = meta:get("tollgate") or {}
  local cluster = CLUSTER
  if decided["process"] ~= nil then cluster = CLUSTER .. "_" .. decided["process"] end
  local before = decided["attempt_status"] -- "" after an attempt that got no response
  meta:set("tollgate", "attempt_status", "")
  if before == nil and provider == decided["first_attempt"] then
    return -- the first attempt, to the provider the decision made it for
  end
  -- The body is held until the answer says whether it is this provider's own: Envoy
  -- replays it from the copy it keeps for retries, so it is all there at once.
  handle:body()
  local answer, answer_body = handle:httpCall(cluster, {
    [":method"] = "POST", [":path"] = "/attempt", [":authority"] = "tollgate",
    ["x-tollgate-request"] = decided["request_id"] or "",
    ["x-tollgate-provider"] = provider, ["x-tollgate-status"] = before or "",
  }, "", TIMEOUT_MS)
  apply_answer(handle, answer, answer_body)
end

function envoy_on_request(handle)
  or_500(handle, "tollgate.attempt", attempt)
end

function envoy_on_response(handle)
  -- For the next attempt, if Envoy retries this one.
  handle:streamInfo():dynamicMetadata():set("tollgate", "attempt_status",
                                            handle:headers():get(":status") or "")
end

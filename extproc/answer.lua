-- An answer of tollgate's decision service (extproc/decider.py says what it holds), applied
-- to the request: the dynamic metadata for the filters after it, and either the gateway's
-- own reply or the headers to set and remove, the path, the host and the body. Shared by
-- tollgate.decide (a request's decision) and tollgate.attempt (each attempt of a fallback
-- plan); the renderer puts it before each.
local PREFIX = "x-tollgate-"
local META, SET = PREFIX .. "meta-", PREFIX .. "set-"

-- Returns false when the request was answered here (nothing is forwarded).
local function apply_answer(handle, answer, answer_body)
  local meta = handle:streamInfo():dynamicMetadata()
  local status = answer[":status"]
  if status == "503" or status == "504" then
    -- The decision service is down or too slow (Envoy's own answer): the gateway's
    -- gateway_unavailable, and the outage log keeps the request.
    meta:set("tollgate", "decider", "unavailable")
    handle:respond({[":status"] = "503"}, "")
    return false
  elseif status ~= "200" then
    error("the decision service answered " .. tostring(status))
  end
  local sets = {}
  for name, value in pairs(answer) do
    if name:sub(1, #META) == META then
      meta:set("tollgate", name:sub(#META + 1), value)
    elseif name:sub(1, #SET) == SET then
      sets[name:sub(#SET + 1)] = value
    end
  end
  local reply = answer[PREFIX .. "reply"]
  if reply ~= nil then
    sets[":status"] = reply
    handle:respond(sets, answer_body)
    return false
  end
  local headers = handle:headers()
  local removed = answer[PREFIX .. "remove"]
  if removed ~= nil then
    for name in removed:gmatch("[^,%s]+") do headers:remove(name) end
  end
  for name, value in pairs(sets) do headers:replace(name, value) end
  if answer[PREFIX .. "path"] ~= nil then headers:replace(":path", answer[PREFIX .. "path"]) end
  if answer[PREFIX .. "authority"] ~= nil then
    headers:replace(":authority", answer[PREFIX .. "authority"])
  end
  if answer[PREFIX .. "body"] == "replaced" then
    handle:body(true):setBytes(answer_body)
  end
  return true
end

-- Runs `step` on the request; anything that goes wrong in it answers 500 (Envoy's reply
-- becomes the gateway's gateway_error): a request is never forwarded undecided.
local function or_500(handle, name, step)
  local ok, err = pcall(step, handle)
  if not ok then
    handle:logErr(name .. ": " .. tostring(err))
    pcall(function() handle:respond({[":status"] = "500"}, "") end)
  end
end

//! Lua scripts: they read the clock of the Redis server (not of any node) and
//! run atomically, so liveness and answers do not depend on node clocks.
//!
//! Every invocation names the nodes key among its KEYS, even where the script
//! builds its key names from the prefix: a Redis Cluster routes a script by
//! its keys, and every directory key shares the nodes key's slot there.

use std::sync::LazyLock;

use redis::Script;

const NOW: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"#;

/// ARGV: prefix, node, ttl_ms. Renews the node's liveness deadline and returns
/// `{now_ms, previous_deadline_or_0, {node, deadline, node, deadline, ...}}`.
pub(crate) static HEARTBEAT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"{NOW}
local p, node, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local prev = redis.call('ZSCORE', p .. ':nodes', node)
redis.call('ZADD', p .. ':nodes', now + ttl, node)
return {{now, tonumber(prev or 0), redis.call('ZRANGE', p .. ':nodes', 0, -1, 'WITHSCORES')}}
"#
    ))
});

/// ARGV: prefix, node, threshold_ms, drop_queue (0/1). If the node's deadline
/// is still at or before the threshold (it did not come back), removes its
/// directory entries, its liveness entry and, if asked, its queue. Returns 1 if
/// it collected the node.
pub(crate) static COLLECT_DEAD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
local p, n, threshold, drop_queue = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local s = redis.call('ZSCORE', p .. ':nodes', n)
if not s or tonumber(s) > threshold then return 0 end
{CLEAR}
redis.call('ZREM', p .. ':nodes', n)
if drop_queue == '1' then redis.call('DEL', p .. ':q:' .. n) end
return 1
"#
    ))
});

/// Removes every directory entry of node `n` (not its liveness, not its queue);
/// leaves the number of connections removed in `conns`.
const CLEAR: &str = r#"
local conns = redis.call('SMEMBERS', p .. ':nc:' .. n)
for _, c in ipairs(conns) do
  local u = redis.call('HGET', p .. ':conn:' .. c, 'user')
  if u then
    redis.call('SREM', p .. ':user:' .. u, c)
    redis.call('HDEL', p .. ':uc:' .. u, n)
  end
  for _, g in ipairs(redis.call('SMEMBERS', p .. ':cg:' .. c)) do
    redis.call('SREM', p .. ':group:' .. g, c)
    redis.call('HDEL', p .. ':gc:' .. g, n)
  end
  redis.call('DEL', p .. ':conn:' .. c, p .. ':cg:' .. c, p .. ':sess:' .. c)
end
redis.call('DEL', p .. ':nc:' .. n)
"#;

/// ARGV: prefix, node. Removes every directory entry of the node. Returns how
/// many connections it removed.
pub(crate) static CLEAR_NODE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"
local p, n = ARGV[1], ARGV[2]
{CLEAR}
return #conns
"#
    ))
});

/// ARGV: prefix, kind, argument. Answers a query from the directory, counting
/// only connections of nodes whose liveness deadline has not passed.
pub(crate) static QUERY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        r#"{NOW}
local p, kind, arg = ARGV[1], ARGV[2], ARGV[3]
local seen = {{}}
local function live(node)
  if seen[node] == nil then
    local s = redis.call('ZSCORE', p .. ':nodes', node)
    seen[node] = (s ~= false and s ~= nil and tonumber(s) > now)
  end
  return seen[node]
end
local function node_of(conn) return string.match(conn, '^(.*)%.[0-9a-f]+$') end
if kind == 'online' then
  for _, n in ipairs(redis.call('HKEYS', p .. ':uc:' .. arg)) do
    if live(n) then return 1 end
  end
  return 0
elseif kind == 'user_conns' or kind == 'group_members' then
  local key = p .. (kind == 'user_conns' and ':user:' or ':group:') .. arg
  local out = {{}}
  for _, c in ipairs(redis.call('SMEMBERS', key)) do
    local n = node_of(c)
    if n and live(n) then table.insert(out, c) end
  end
  return out
elseif kind == 'group_count' then
  local h = redis.call('HGETALL', p .. ':gc:' .. arg)
  local sum = 0
  for i = 1, #h, 2 do
    if live(h[i]) then sum = sum + tonumber(h[i + 1]) end
  end
  return sum
elseif kind == 'conn_exists' then
  local n = node_of(arg)
  if n and live(n) and redis.call('EXISTS', p .. ':conn:' .. arg) == 1 then return 1 end
  return 0
elseif kind == 'conn_user' then
  local n = node_of(arg)
  if n and live(n) then
    local u = redis.call('HGET', p .. ':conn:' .. arg, 'user')
    if u then return {{u}} end
  end
  return {{}}
end
return redis.error_reply('unknown query ' .. kind)
"#
    ))
});

/// KEYS: the user and group node hashes a batch of pushes needs, then the
/// nodes key (always there, so that a Redis Cluster routes the script to the
/// directory's shard). ARGV: "1" to also read the clock and the nodes, unused,
/// a pattern of channels or "". Returns the holders of every key as one string (nodes joined by `,`,
/// keys by ` `; node ids never contain either), then `TIME` and the nodes with
/// their deadlines (nil unless asked), then, if a pattern was given, the
/// channels matching it that have a subscriber.
///
/// One string instead of one reply per key: the replies, not Redis's work,
/// were most of what a lookup cost the publishing node.
pub(crate) static ROUTE_LOOKUP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local out = {}
for i = 1, #KEYS - 1 do out[i] = table.concat(redis.call('HKEYS', KEYS[i]), ',') end
local r = {table.concat(out, ' ')}
r[2], r[3] = false, false
if ARGV[1] == '1' then
  r[2] = redis.call('TIME')
  r[3] = redis.call('ZRANGE', KEYS[#KEYS], 0, -1, 'WITHSCORES')
end
if ARGV[3] ~= '' then r[4] = redis.call('PUBSUB', 'CHANNELS', ARGV[3]) end
return r
"#,
    )
});

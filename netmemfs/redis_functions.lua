#!lua name=netmemfs_2

-- The netmemfs Redis store's functions for the key layout `netmemfs-redis 2`
-- (docs/protocol.md, "Redis store"). The library's name carries the layout's number:
-- Redis refuses to load another release's library beside it, as both register the
-- same function names. Every function touches the keys of one hash slot only: an
-- inode's data keys ({P:ino}...) or the namespace keys ({P}...), all given in KEYS, so
-- each call is atomic on one node, Redis Cluster or not. Errors are replies
-- "NM<code> <message>", code being a netmemfs error code (netmemfs/errors.py), so the
-- client raises the matching class.

local PAGE = 4096
-- 63 pages, not 64: a string of 63 pages and its header fit jemalloc's 256 KiB size
-- class, where 64 pages would take the 320 KiB one (25% of every chunk lost).
local CHUNK_PAGES = 63
local CHUNK = PAGE * CHUNK_PAGES

local function fail(code, msg)
    return redis.error_reply('NM' .. code .. ' ' .. msg)
end

-- The time in ns, as a string (a Lua number, a double, holds it only to ~256 ns).
local function now_ns()
    local t = redis.call('TIME')
    return t[1] .. string.format('%06d', tonumber(t[2])) .. '000'
end

local function now_ms()
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function pages_for(size)
    return math.floor((size + PAGE - 1) / PAGE)
end

-- Remember txn -> value in hash tkey, the oldest forgotten past keep (list qkey).
local function remember(tkey, qkey, txn, value, keep)
    redis.call('HSET', tkey, txn, value)
    if redis.call('RPUSH', qkey, txn) > keep then
        redis.call('HDEL', tkey, redis.call('LPOP', qkey))
    end
end

-- Write data at byte off of the string at key, now `have` bytes long. SETRANGE within
-- the string; past its end, the string is made anew at its exact length, because
-- SETRANGE grows a string to twice what it needs (up to 2.5x the data for a chunk
-- written page by page), and that slack would stay for the chunk's life.
local function put(key, off, data, have)
    if off + #data <= have then
        redis.call('SETRANGE', key, off, data)
        return
    end
    local head = ''
    if have > 0 and off > 0 then
        head = redis.call('GETRANGE', key, 0, math.min(have, off) - 1)
    end
    if off > have then
        head = head .. string.rep('\0', off - have)
    end
    redis.call('SET', key, head .. data, 'KEEPTTL')
end

-- Cut chunk c (key) to what a file of `size` bytes keeps of it, the bytes past the end
-- of a partial last page zeroed (they read as zeros if the file grows). Returns the
-- pages it no longer stores. Keeps the key's TTL (a staged copy's).
local function cut_chunk(key, c, size)
    local keep = pages_for(size)
    local have = redis.call('STRLEN', key)
    local lo = (keep - c * CHUNK_PAGES) * PAGE
    local freed = 0
    if lo <= 0 then
        redis.call('UNLINK', key)
        return have / PAGE
    elseif have > lo then
        redis.call('SET', key, redis.call('GETRANGE', key, 0, lo - 1), 'KEEPTTL')
        freed = (have - lo) / PAGE
        have = lo
    end
    local tail = size % PAGE
    if tail > 0 and math.floor((keep - 1) / CHUNK_PAGES) == c then
        local off = ((keep - 1) % CHUNK_PAGES) * PAGE + tail
        if have > off then
            redis.call('SETRANGE', key, off, string.rep('\0', have - off))
        end
    end
    return freed
end

-- nm_commit: one atomic, exactly-once commit of one regular file's pages and size.
-- KEYS: 1 meta hash, 2 txn hash, 3 txn list, 4 locks, 5.. chunk keys (ops name them
-- by index).
-- ARGV: 1 txn, 2 init size ('' if the caller does not know it), 3 expected version
-- ('' none), 4 txns to remember, 5 the size the caller declared chunk keys up to,
-- 6 notice channel, 7 lock tokens it is fenced by (space-separated, '' none), 8 the
-- caller's claim, 'NAME GENERATION' ('' none: see below), then ops, each 'T' size
-- first_key_index | 'W' key_index page data.
-- A claim fences a replaced client per file: the meta hash keeps, in field
-- 'claim:NAME', the newest generation of NAME that committed to the file, and a
-- commit under an older one is refused (fenced).
-- A 'T' that shrinks names the chunk keys from the one holding the new last page
-- through the one holding the declared size's last page.
-- Reply: {version, size, replayed 0/1}.
local function nm_commit(keys, args)
    local meta, tkey, qkey = keys[1], keys[2], keys[3]
    local txn = args[1]
    local done = redis.call('HGET', tkey, txn)
    if done then
        local v, s = string.match(done, '(%d+) (%d+)')
        return {tonumber(v), tonumber(s), 1}
    end
    local m = redis.call('HMGET', meta, 'size', 'version', 'stored', 'gone')
    if m[4] then
        return fail('stale', 'the file no longer exists (removed and let go by every client)')
    end
    local size, version, stored
    if m[1] then
        size, version, stored = tonumber(m[1]), tonumber(m[2]), tonumber(m[3])
    elseif args[2] ~= '' then
        size, version, stored = tonumber(args[2]), 0, 0
    else
        return fail('init', 'the file has no data record yet; send its size')
    end
    if args[7] ~= '' then
        local t = now_ms()
        for token in string.gmatch(args[7], '%d+') do
            local held = redis.call('HGET', keys[4], token)
            if not held or tonumber(string.match(held, '^%S+ (%d+)')) < t then
                return fail('fenced', 'lock ' .. token .. ' is no longer held (released, or '
                    .. 'its lease ran out): the changes made under it are refused')
            end
        end
    end
    local claim_field, claim_gen
    if args[8] ~= '' then
        local name, gen = string.match(args[8], '^(%x+) (%d+)$')
        if not name then
            return fail('protocol', 'a claim is NAME GENERATION')
        end
        claim_field, claim_gen = 'claim:' .. name, tonumber(gen)
        local newest = tonumber(redis.call('HGET', meta, claim_field) or '0')
        if newest > claim_gen then
            return fail('fenced', 'a newer client claimed ' .. name .. ' (generation '
                .. newest .. ', this one ' .. claim_gen .. ') and committed to this file: '
                .. 'the older one\'s commits to it are refused')
        end
        if newest == claim_gen then
            claim_field = nil  -- already recorded
        end
    end
    if args[3] ~= '' and tonumber(args[3]) ~= version then
        return fail('conflict', 'the file is at version ' .. version .. ', not ' .. args[3])
    end
    if size > tonumber(args[5]) then
        return fail('resize', tostring(size))
    end
    -- First every check, against the size the ops before it leave; then the changes. A
    -- function's writes stand even if it fails later: no check may come after one.
    local sz = size
    local i = 9
    while i <= #args do
        local op = args[i]
        if op == 'T' then
            sz = tonumber(args[i + 1])
            i = i + 3
        elseif op == 'W' then
            local first, n = tonumber(args[i + 2]), #args[i + 3]
            if n == 0 or n % PAGE ~= 0 or first % CHUNK_PAGES + n / PAGE > CHUNK_PAGES then
                return fail('protocol', 'a write is not of whole pages within one chunk')
            end
            if first + n / PAGE > pages_for(sz) then
                return fail('out_of_range', 'write to pages ' .. first .. '..' .. (first + n / PAGE - 1)
                    .. ' goes past the end of the file (' .. sz .. ' bytes); resize it first')
            end
            i = i + 4
        elseif op == 'S' then
            if tonumber(args[i + 4]) ~= version then
                return fail('restage', 'the file changed since its pages were staged')
            end
            if redis.call('STRLEN', keys[tonumber(args[i + 2])]) == 0 then
                return fail('restage', 'staged pages expired before the commit')
            end
            i = i + 6
        else
            return fail('protocol', 'unknown op ' .. tostring(op))
        end
    end
    local runs = {}
    i = 9
    while i <= #args do
        local op = args[i]
        if op == 'T' then
            local new = tonumber(args[i + 1])
            local k = tonumber(args[i + 2])
            if new < size then
                -- The chunk keys from the one holding the new last page (partial or
                -- whole) through the old size's last chunk, in order from keys[k].
                local c = math.floor(math.max(pages_for(new) - 1, 0) / CHUNK_PAGES)
                local last = math.floor((pages_for(size) - 1) / CHUNK_PAGES)
                while c <= last do
                    stored = stored - cut_chunk(keys[k], c, new)
                    c = c + 1
                    k = k + 1
                end
            end
            size = new
            runs = nil
            i = i + 3
        elseif op == 'W' then
            local key, first, data = keys[tonumber(args[i + 1])], tonumber(args[i + 2]), args[i + 3]
            local count = #data / PAGE
            local have = redis.call('STRLEN', key)
            local off = (first % CHUNK_PAGES) * PAGE
            put(key, off, data, have)
            if off + #data > have then
                stored = stored + (off + #data - have) / PAGE
            end
            if runs then
                runs[#runs + 1] = {first, count}
            end
            i = i + 4
        elseif op == 'S' then
            -- Chunk c's staged copy (nm_stage) replaces it: a rename, no copy.
            local key, staged = keys[tonumber(args[i + 1])], keys[tonumber(args[i + 2])]
            local c = tonumber(args[i + 3])
            local have = redis.call('STRLEN', key)
            if have > 0 then
                -- The old chunk is set aside, not freed here: freeing a GiB of them
                -- would hold the node for a long time. The client deletes them after
                -- (nm_commit's reply), and they expire if it cannot.
                local old = keys[tonumber(args[i + 5])]
                redis.call('RENAME', key, old)
                redis.call('PEXPIRE', old, 60000)
            end
            local len = redis.call('STRLEN', staged)
            redis.call('RENAME', staged, key)
            redis.call('PERSIST', key)
            stored = stored + (len - have) / PAGE
            if (c + 1) * CHUNK > size then
                -- Pages staged past the end (a shrink since): cut like a truncate's.
                stored = stored - cut_chunk(key, c, size)
            end
            runs = nil
            i = i + 6
        end
    end
    version = version + 1
    local t = now_ns()
    redis.call('HSET', meta, 'size', size, 'version', version, 'stored', stored, 'mtime', t)
    if claim_field then
        redis.call('HSET', meta, claim_field, claim_gen)
    end
    remember(tkey, qkey, txn, version .. ' ' .. size, tonumber(args[4]))
    -- The committing client's id (the txn's first 8 bytes): it does not hear its own.
    local notice = {version, runs or {}, runs == nil, string.sub(txn, 1, 8)}
    redis.call('SPUBLISH', args[6], cmsgpack.pack(notice))
    return {version, size, 0}
end

-- nm_stage: pages of a large commit, staged into a copy of their chunk that expires by
-- itself (a dead client's staging goes away). KEYS: 1 data record, 2 live chunk, 3 staged
-- copy. ARGV: 1 ttl ms, 2 the version the commit is based on, 3 chunk number, 4 the
-- smallest size the commit truncates to (-1: none), then (first page in the chunk,
-- data) pairs. Reply: 1; or `restage` if the file is at another version.
local function nm_stage(keys, args)
    local version = tonumber(redis.call('HGET', keys[1], 'version') or '0')
    if version ~= tonumber(args[2]) then
        return fail('restage', 'the file changed since the commit began')
    end
    if redis.call('EXISTS', keys[3]) == 0 then
        if redis.call('EXISTS', keys[2]) == 1 then
            redis.call('COPY', keys[2], keys[3])
        else
            redis.call('SET', keys[3], '')
        end
        if tonumber(args[4]) >= 0 then
            cut_chunk(keys[3], tonumber(args[3]), tonumber(args[4]))
        end
    end
    local have = redis.call('STRLEN', keys[3])
    for j = 5, #args, 2 do
        local off = tonumber(args[j]) * PAGE
        put(keys[3], off, args[j + 1], have)
        have = math.max(have, off + #args[j + 1])
    end
    redis.call('PEXPIRE', keys[3], tonumber(args[1]))
    return 1
end

-- nm_read: pages of one file. KEYS: 1 meta, 2.. chunk keys. ARGV: (first byte, last
-- byte) per chunk key. Reply: {size or -1 (no data record), version, gone, bytes...};
-- bytes shorter than asked for end in holes.
local function nm_read(keys, args)
    local m = redis.call('HMGET', keys[1], 'size', 'version', 'gone')
    local out = {tonumber(m[1] or '-1'), tonumber(m[2] or '0'), m[3] and 1 or 0}
    for k = 2, #keys do
        out[#out + 1] = redis.call('GETRANGE', keys[k], args[2 * k - 3], args[2 * k - 2])
    end
    return out
end

-- nm_drop: free a reaped file's pages. KEYS: 1 meta, 2.. its chunk keys.
local function nm_drop(keys, args)
    for k = 2, #keys do
        redis.call('UNLINK', keys[k])
    end
    redis.call('DEL', keys[1])
    redis.call('HSET', keys[1], 'gone', 1)
    return 1
end

-- nm_ns: apply one namespace transaction, computed by the client from the records it
-- read, if nothing changed since (the namespace's sequence number) and it is new.
-- KEYS: 1 seq, 2 inodes, 3 txns, 4 txn list, 5 next ino, 6 orphans, 7 reaping, 8..
-- directories. ARGV: 1 expected seq, 2 txn, 3 packed result, 4 next ino, 5 txns to
-- remember, then sections, each a count and its items: records set (ino, record),
-- records deleted (ino), orphans added, orphans removed, reaping added, and then per
-- directory key (KEYS[8..]): 'D' (delete it) or a count of (name, ino or '') pairs.
-- Reply: {'ok'} | {'retry'} | {'replayed', result}.
local function nm_ns(keys, args)
    local done = redis.call('HGET', keys[3], args[2])
    if done then
        return {'replayed', done}
    end
    if (redis.call('GET', keys[1]) or '0') ~= args[1] then
        return {'retry'}
    end
    local i = 6
    local n = tonumber(args[i])
    for j = 1, n do
        redis.call('HSET', keys[2], args[i + 2 * j - 1], args[i + 2 * j])
    end
    i = i + 2 * n + 1
    for _, cmd in ipairs({{'HDEL', 2}, {'SADD', 6}, {'SREM', 6}, {'SADD', 7}}) do
        n = tonumber(args[i])
        for j = 1, n do
            redis.call(cmd[1], keys[cmd[2]], args[i + j])
        end
        i = i + n + 1
    end
    for k = 8, #keys do
        if args[i] == 'D' then
            redis.call('DEL', keys[k])
            i = i + 1
        else
            n = tonumber(args[i])
            for j = 1, n do
                local name, ino = args[i + 2 * j - 1], args[i + 2 * j]
                if ino == '' then
                    redis.call('HDEL', keys[k], name)
                else
                    redis.call('HSET', keys[k], name, ino)
                end
            end
            i = i + 2 * n + 1
        end
    end
    redis.call('SET', keys[5], args[4])
    redis.call('INCR', keys[1])
    remember(keys[3], keys[4], args[2], args[3], tonumber(args[5]))
    return {'ok'}
end

-- nm_format: make the namespace if there is none. KEYS: 1 format, 2 inodes, 3 next,
-- 4 root's directory. ARGV: 1 format string, 2 root's record. Reply: the format found.
local function nm_format(keys, args)
    local have = redis.call('GET', keys[1])
    if have then
        return have
    end
    if redis.call('EXISTS', keys[2], keys[3], keys[4]) > 0 then
        return fail('protocol', 'netmemfs keys without a format key: not ours, or damaged')
    end
    redis.call('SET', keys[1], args[1])
    redis.call('HSET', keys[2], '1', args[2])
    redis.call('SET', keys[3], '2')
    return args[1]
end

-- nm_claim: the next generation of a claimed name (KEYS[1] its counter, {P}:claim:NAME;
-- see nm_commit). Called twice, it hands out two: the caller keeps the later one.
local function nm_claim(keys, args)
    return redis.call('INCR', keys[1])
end

-- nm_hold: client holds exactly the inodes of ARGV[3] (space-separated) for ARGV[2] ms.
-- KEYS: 1 holds hash (client -> 'expiry_ms ino ino ...'). ARGV: 1 client ('': only
-- ask).
-- Reply: every inode some client holds now.
local function nm_hold(keys, args)
    local t = now_ms()
    local held = {}
    if args[1] == '' then
        -- only asking
    elseif args[3] == '' then
        redis.call('HDEL', keys[1], args[1])
    else
        redis.call('HSET', keys[1], args[1], (t + tonumber(args[2])) .. ' ' .. args[3])
    end
    local all = redis.call('HGETALL', keys[1])
    for j = 1, #all, 2 do
        local expiry, inos = string.match(all[j + 1], '(%d+) ?(.*)')
        if tonumber(expiry) < t then
            redis.call('HDEL', keys[1], all[j])
        else
            for ino in string.gmatch(inos, '%d+') do
                held[#held + 1] = ino
            end
        end
    end
    return held
end

-- Locks on byte ranges of one file, in its slot. KEYS[1] the locks hash {P:ino}:l:
-- token -> 'owner expiry_ms start end kind' (end -1: past any end; kind x or s).
local function lock_entry(raw)
    local owner, expiry, range = string.match(raw, '^(%S+) (%d+) (.*)$')
    local lo, hi, kind = string.match(range, '^(%d+) (%-?%d+) (%a)$')
    return owner, tonumber(expiry), tonumber(lo), tonumber(hi), kind, range
end

local function overlaps(lo1, hi1, lo2, hi2)
    return (hi2 < 0 or lo1 < hi2) and (hi1 < 0 or lo2 < hi1)
end

-- nm_lock: grant a lock unless a lock in force conflicts. KEYS: 1 locks, 2 token counter,
-- 3 the file's data record. ARGV: 1 owner, 2 lease ms, 3 start, 4 end (-1: any end),
-- 5 'x' or 's'. Reply: {token (0: not granted), the file's version}.
local function nm_lock(keys, args)
    local t = now_ms()
    local lo, hi, kind = tonumber(args[3]), tonumber(args[4]), args[5]
    local all = redis.call('HGETALL', keys[1])
    local version = tonumber(redis.call('HGET', keys[3], 'version') or '0')
    for j = 1, #all, 2 do
        local _, expiry, lo2, hi2, kind2 = lock_entry(all[j + 1])
        if expiry < t then
            redis.call('HDEL', keys[1], all[j])
        elseif (kind == 'x' or kind2 == 'x') and overlaps(lo, hi, lo2, hi2) then
            return {0, version}
        end
    end
    local token = redis.call('INCR', keys[2])
    redis.call('HSET', keys[1], token, table.concat({args[1], t + tonumber(args[2]),
        args[3], args[4], kind}, ' '))
    return {token, version}
end

-- nm_unlock: KEYS: 1 locks. ARGV: 1 owner, 2 token. Reply: 1, or 0 if not held.
local function nm_unlock(keys, args)
    local held = redis.call('HGET', keys[1], args[2])
    if not held or lock_entry(held) ~= args[1] then
        return 0
    end
    redis.call('HDEL', keys[1], args[2])
    return 1
end

-- nm_renew: KEYS: 1 locks. ARGV: 1 owner, 2 lease ms, then tokens. Each of owner's
-- locks in force lasts a lease from now. Reply: the tokens no longer held.
local function nm_renew(keys, args)
    local t = now_ms()
    local lost = {}
    for j = 3, #args do
        local held = redis.call('HGET', keys[1], args[j])
        local owner, expiry, range
        if held then
            local entry = {lock_entry(held)}
            owner, expiry, range = entry[1], entry[2], entry[6]
        end
        if not held or owner ~= args[1] or expiry < t then
            lost[#lost + 1] = args[j]
        else
            redis.call('HSET', keys[1], args[j], owner .. ' ' .. (t + tonumber(args[2])) .. ' ' .. range)
        end
    end
    return lost
end

redis.register_function('nm_commit', nm_commit)
redis.register_function('nm_stage', nm_stage)
redis.register_function{function_name = 'nm_read', callback = nm_read, flags = {'no-writes'}}
redis.register_function('nm_drop', nm_drop)
redis.register_function('nm_ns', nm_ns)
redis.register_function('nm_format', nm_format)
redis.register_function('nm_hold', nm_hold)
redis.register_function('nm_claim', nm_claim)
redis.register_function('nm_lock', nm_lock)
redis.register_function('nm_unlock', nm_unlock)
redis.register_function('nm_renew', nm_renew)

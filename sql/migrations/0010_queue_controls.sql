-- compatible-with: 1
-- Queue controls shared by every worker on every machine, enforced by the claim itself:
-- pause and resume a queue, a limit of jobs running at once across all workers, and a
-- rate limit (jobs started per second across all workers, with a burst). A queue with
-- none of them has no row here, and its claims are 0009's: one probe of this table more.

create table pgqueue.queues (
    name text primary key
        constraint queues_name check (name ~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$'),
    paused boolean not null default false,
    -- at most this many of its jobs running at once, across every worker (null: no limit)
    max_running integer constraint queues_max_running_positive check (max_running >= 1),
    -- at most this many of its jobs started per second, across every worker (null: no limit),
    -- with bursts of up to `burst` (default: one second's worth)
    rate_per_second double precision
        constraint queues_rate_positive check (rate_per_second > 0 and rate_per_second <= 1000000),
    burst integer constraint queues_burst_positive check (burst >= 1),
    -- the rate limit's token bucket: `tokens` starts left at `refilled_at`
    tokens double precision not null default 0,
    refilled_at timestamptz not null default now(),
    changed_at timestamptz not null default now()
);
comment on table pgqueue.queues is
    'pgqueue queue controls: paused, max_running (across all workers), rate_per_second and burst.';

-- Starts a rate-limited queue may make at `p_now`: its bucket refilled since it was last
-- used, up to the burst.
create function pgqueue.queue_tokens(p_queue pgqueue.queues, p_now timestamptz)
returns double precision
language sql immutable as $$
    select least(
        coalesce(p_queue.burst, greatest(1, ceil(p_queue.rate_per_second)))::double precision,
        p_queue.tokens + p_queue.rate_per_second
            * greatest(0, extract(epoch from p_now - p_queue.refilled_at)::double precision))
$$;

-- A queue something knows about: a job, a task registered to it, a worker serving it,
-- or controls of its own. Pausing or limiting any other name is a typing error.
create function pgqueue.known_queue(p_queue text)
returns boolean
language sql stable as $$
    select exists (select from pgqueue.queues q where q.name = p_queue)
        or exists (select from pgqueue.tasks t where t.queue = p_queue)
        or exists (select from pgqueue.worker_sessions w
                   where p_queue = any(w.queues) and w.stopped_at is null and w.expires_at > now())
        or exists (select from pgqueue.active_jobs j where j.state = 'queued' and j.queue = p_queue)
        or exists (select from pgqueue.active_jobs j where j.state = 'running' and j.queue = p_queue)
$$;

create function pgqueue.require_known_queue(p_queue text, p_caller text)
returns void
language plpgsql stable as $$
begin
    if p_queue is null or not pgqueue.known_queue(p_queue) then
        raise exception '%: no queue named % (no job, registered task or live worker has it)',
            p_caller, coalesce(quote_literal(p_queue), 'NULL')
            using errcode = '22023', hint = 'check the name: pgqueue status lists the queues';
    end if;
end
$$;

create function pgqueue.pause_queue(p_queue text)
returns void
language plpgsql volatile as $$
begin
    perform pgqueue.require_known_queue(p_queue, 'pgqueue.pause_queue');
    insert into pgqueue.queues as q (name, paused) values (p_queue, true)
    on conflict (name) do update set paused = true, changed_at = now();
end
$$;

-- Resuming wakes the queue's idle workers at once.
create function pgqueue.resume_queue(p_queue text)
returns void
language plpgsql volatile as $$
begin
    perform pgqueue.require_known_queue(p_queue, 'pgqueue.resume_queue');
    update pgqueue.queues set paused = false, changed_at = now() where name = p_queue;
    delete from pgqueue.queues
    where name = p_queue and max_running is null and rate_per_second is null and not paused;
    perform pg_notify('pgqueue_jobs', p_queue);
end
$$;

-- Set (or, with NULL, lift) the queue's limits; the other settings stay as they are.
create function pgqueue.limit_queue(
    p_queue text,
    p_max_running integer,
    p_rate_per_second double precision,
    p_burst integer default null
) returns void
language plpgsql volatile as $$
begin
    if p_max_running is not null and p_max_running < 1 then
        raise exception 'pgqueue.limit_queue: max_running must be at least 1 (or NULL for no limit), got %',
            p_max_running using errcode = '22023';
    end if;
    if p_rate_per_second is not null and not (p_rate_per_second > 0 and p_rate_per_second <= 1000000) then
        raise exception 'pgqueue.limit_queue: rate_per_second must be more than 0 and at most 1,000,000 (or NULL for no limit), got %',
            p_rate_per_second using errcode = '22023';
    end if;
    if p_burst is not null and (p_burst < 1 or p_rate_per_second is null) then
        raise exception 'pgqueue.limit_queue: burst must be at least 1, and goes with a rate, got % with rate %',
            p_burst, coalesce(p_rate_per_second::text, 'NULL') using errcode = '22023';
    end if;
    perform pgqueue.require_known_queue(p_queue, 'pgqueue.limit_queue');
    insert into pgqueue.queues as q (name, max_running, rate_per_second, burst, tokens, refilled_at)
    values (p_queue, p_max_running, p_rate_per_second, p_burst,
            case when p_rate_per_second is not null
                 then coalesce(p_burst, greatest(1, ceil(p_rate_per_second))) else 0 end, now())
    on conflict (name) do update
    set max_running = excluded.max_running, rate_per_second = excluded.rate_per_second,
        burst = excluded.burst, tokens = excluded.tokens, refilled_at = excluded.refilled_at,
        changed_at = now();
    delete from pgqueue.queues
    where name = p_queue and max_running is null and rate_per_second is null and not paused;
    -- a raised limit may let idle workers claim now
    perform pg_notify('pgqueue_jobs', p_queue);
end
$$;

-- Queues with controls, and how many of their jobs run now.
create view pgqueue.queue_controls as
select q.name as queue, q.paused, q.max_running, q.rate_per_second,
       case when q.rate_per_second is not null
            then coalesce(q.burst, greatest(1, ceil(q.rate_per_second)))::integer end as burst,
       (select count(*) from pgqueue.active_jobs j where j.state = 'running' and j.queue = q.name) as running,
       q.changed_at
from pgqueue.queues q;

-- What each queue's cap leaves after this claim so far: the jobs it took are this
-- worker's running ones started at this claim's time (one read of the worker's running
-- jobs, by their index; counting row by row in PL/pgSQL doubled a claim's time).
create function pgqueue.caps_left(p_worker text, p_now timestamptz, p_queues text[], p_caps integer[])
returns integer[]
language sql stable as $$
    select array_agg(greatest(0, g.cap - coalesce(t.taken, 0)) order by g.n)
    from unnest(p_queues, p_caps) with ordinality as g(name, cap, n)
    left join (select j.queue, count(*)::integer as taken from pgqueue.active_jobs j
               where j.worker = p_worker and j.state = 'running' and j.started_at = p_now
               group by j.queue) t on t.queue = g.name
$$;

-- The claim, 0009's with queue controls. A queue without controls has no row in
-- pgqueue.queues, and its claim is 0009's (one probe of that table more). Otherwise
-- paused queues are left out; the rows of limited ones are locked (in name order, so two
-- claims never deadlock), so their claims take turns and each sees what the one before
-- it took; each queue's cap is what its running limit and its tokens allow, and the
-- claim takes jobs in priority order up to the caps.
create or replace function pgqueue.claim_jobs(
    p_worker text,
    p_queues text[],
    p_limit integer,
    p_lease_seconds double precision,
    p_now timestamptz default null
) returns table (
    id bigint, task text, args jsonb, queue text, priority smallint, attempt integer,
    max_attempts integer, timeout_seconds double precision, run_at timestamptz, created_at timestamptz
)
language plpgsql volatile as $$
#variable_conflict use_column
declare
    v_now timestamptz := coalesce(p_now, now());
    v_left integer := p_limit;
    v_controlled boolean;
    v_queues text[];
    v_caps integer[];
    v_granted integer[];
    v_level smallint;
    v_claimed integer;
begin
    v_queues := array(select distinct q from unnest(p_queues) as q);
    v_controlled := exists (select from pgqueue.queues c where c.name = any(v_queues));
    if v_controlled then
        perform 1 from pgqueue.queues c
        where c.name = any(v_queues) and not c.paused
          and (c.max_running is not null or c.rate_per_second is not null)
        order by c.name
        for update;
        select array_agg(s.name order by s.n), array_agg(s.cap order by s.n) into v_queues, v_caps
        from (
            select u.name, u.n, least(
                    p_limit,
                    coalesce(c.max_running - (select count(*) from pgqueue.active_jobs j
                                              where j.state = 'running' and j.queue = u.name)::integer,
                             p_limit),
                    coalesce(case when c.rate_per_second is not null
                                  then floor(pgqueue.queue_tokens(c, v_now))::integer end, p_limit)) as cap
            from unnest(v_queues) with ordinality as u(name, n)
            left join pgqueue.queues c on c.name = u.name
            where c.name is null or not c.paused
        ) s
        where s.cap > 0;
        if v_queues is null then
            return;
        end if;
    else
        v_caps := array_fill(p_limit, array[cardinality(v_queues)]);
    end if;
    v_granted := v_caps;
    for v_level in
        -- each probe reads the first entry of a level: its priority and its earliest due
        -- time; only levels with a job due now are claimed from (0008)
        with recursive levels(queue, priority, due) as (
            select q.name, first.priority, first.run_at
            from unnest(v_queues) as q(name)
            cross join lateral (select j.priority, j.run_at from pgqueue.active_jobs j
                                where j.state = 'queued' and j.queue = q.name
                                order by j.priority desc, j.run_at limit 1) as first
            union all
            select l.queue, next.priority, next.run_at
            from levels l
            cross join lateral (select j.priority, j.run_at from pgqueue.active_jobs j
                                where j.state = 'queued' and j.queue = l.queue and j.priority < l.priority
                                order by j.priority desc, j.run_at limit 1) as next
        )
        select distinct l.priority from levels l where l.due <= v_now order by 1 desc
    loop
        return query
        with candidates as (
            select c.id, c.run_at
            from unnest(v_queues, v_caps) as q(name, cap)
            cross join lateral (
                select j.id, j.run_at from pgqueue.active_jobs j
                where j.state = 'queued' and j.queue = q.name and j.priority = v_level
                  and j.run_at <= v_now
                order by j.run_at, j.id
                limit least(v_left, q.cap)
                for update skip locked
            ) c
            where q.cap > 0
        ),
        claimable as (
            select c.id from candidates c order by c.run_at, c.id limit v_left
        )
        update pgqueue.active_jobs j
        set state = 'running', attempt = j.attempt + 1, worker = p_worker,
            started_at = v_now, lease_expires_at = v_now + make_interval(secs => p_lease_seconds)
        from claimable c
        where j.id = c.id
        returning j.id, j.task, j.args, j.queue, j.priority, j.attempt, j.max_attempts,
            j.timeout_seconds, j.run_at, j.created_at;
        get diagnostics v_claimed = row_count;
        v_left := v_left - v_claimed;
        exit when v_left <= 0;
        if v_controlled and v_claimed > 0 then
            v_caps := pgqueue.caps_left(p_worker, v_now, v_queues, v_granted);
        end if;
    end loop;
    -- rate-limited queues spend a token per job started (a claim that waited for the lock
    -- may be older than the one before it: time never runs back)
    if v_controlled and exists (select from pgqueue.queues c
                                where c.name = any(v_queues) and c.rate_per_second is not null) then
        v_caps := pgqueue.caps_left(p_worker, v_now, v_queues, v_granted);
        update pgqueue.queues c
        set tokens = pgqueue.queue_tokens(c, v_now) - (s.granted - s.left_over),
            refilled_at = greatest(c.refilled_at, v_now)
        from unnest(v_queues, v_granted, v_caps) as s(name, granted, left_over)
        where c.name = s.name and c.rate_per_second is not null;
    end if;
end
$$;

-- compatible-with: 1
-- Unique jobs: a job enqueued with a key is not created while another job of the same
-- task holds that key; the caller gets the holder's id instead, and is told it was a
-- duplicate. A key is held while its job is queued or running, or, with a window, for
-- that long after it was taken, whatever became of the job (a recent job's result can
-- then be read instead of running the work again).
--
-- The key lives in a table of its own whose primary key decides: two producers taking
-- the same key at once queue on that row, and the second sees the first's job. Jobs
-- without a key never touch it, and the tables of jobs are unchanged.

create table pgqueue.job_keys (
    task text not null,
    key text not null constraint job_keys_key_length check (char_length(key) between 1 and 500),
    job_id bigint not null,
    -- null: held while the job is queued or running
    expires_at timestamptz,
    taken_at timestamptz not null default now(),
    primary key (task, key)
);
comment on table pgqueue.job_keys is
    'pgqueue unique keys: the job holding each (task, key), until its job finishes or expires_at.';

-- Is the key free for another job? VOLATILE on purpose: it reads the jobs with a snapshot
-- of its own, taken after the row lock the upsert below waited for, so it sees the job
-- of a producer that took the key and committed a moment ago.
create function pgqueue.job_key_free(p_key pgqueue.job_keys)
returns boolean
language plpgsql volatile as $$
begin
    if p_key.expires_at is not null then
        return p_key.expires_at <= now();
    end if;
    return not exists (select from pgqueue.active_jobs j where j.id = p_key.job_id);
end
$$;

-- Give job p_job_id (just inserted, in this transaction) the key, or, when another job
-- holds it, remove p_job_id again and answer with the holder: (job id, duplicate).
create function pgqueue.take_job_key(p_task text, p_key text, p_job_id bigint, p_window interval default null)
returns table (id bigint, duplicate boolean)
language plpgsql volatile as $$
#variable_conflict use_column
declare
    v_holder bigint;
begin
    if p_key is null or char_length(p_key) not between 1 and 500 then
        raise exception 'pgqueue: a unique key is 1-500 characters, got %', coalesce(quote_literal(p_key), 'NULL')
            using errcode = '22023';
    end if;
    if p_window is not null and p_window <= interval '0' then
        raise exception 'pgqueue: a unique window must be positive, got %', p_window using errcode = '22023';
    end if;
    insert into pgqueue.job_keys as k (task, key, job_id, expires_at)
    values (p_task, p_key, p_job_id, now() + p_window)
    on conflict (task, key) do update
    set job_id = case when pgqueue.job_key_free(k) then excluded.job_id else k.job_id end,
        expires_at = case when pgqueue.job_key_free(k) then excluded.expires_at else k.expires_at end,
        taken_at = case when pgqueue.job_key_free(k) then now() else k.taken_at end
    returning k.job_id into v_holder;
    if v_holder <> p_job_id then
        delete from pgqueue.active_jobs j where j.id = p_job_id;
    end if;
    return query select v_holder, v_holder <> p_job_id;
end
$$;

-- The SQL face: pgqueue.enqueue's options, and the key (and window). Returns the job's
-- id and whether it is a duplicate (the id of the job that holds the key).
create function pgqueue.enqueue_unique(
    task text,
    unique_key text,
    args jsonb default '{}',
    queue text default null,
    priority integer default null,
    run_at timestamptz default null,
    delay interval default null,
    max_attempts integer default null,
    timeout_seconds double precision default null,
    backoff pgqueue.backoff_kind default null,
    backoff_base_seconds double precision default null,
    backoff_max_seconds double precision default null,
    backoff_jitter double precision default null,
    unique_for interval default null
) returns table (id bigint, duplicate boolean)
language sql volatile as $$
    select k.id, k.duplicate
    from pgqueue.take_job_key(
        task, unique_key,
        pgqueue.enqueue(task, args, queue, priority, run_at, delay, max_attempts, timeout_seconds,
                        backoff, backoff_base_seconds, backoff_max_seconds, backoff_jitter),
        unique_for) as k
$$;

-- Forget keys no job holds any more, a bounded batch at a time (the maintenance leader).
create function pgqueue.prune_job_keys(p_limit integer default 1000)
returns integer
language sql volatile as $$
    with gone as (
        delete from pgqueue.job_keys k
        where (k.task, k.key) in (
            select f.task, f.key from pgqueue.job_keys f
            where case when f.expires_at is not null then f.expires_at <= now()
                       else not exists (select from pgqueue.active_jobs j where j.id = f.job_id) end
            limit p_limit
            for update skip locked)
        returning 1
    )
    select count(*)::integer from gone
$$;

-- compatible-with: 1
-- Least-privilege roles: three NOLOGIN roles to grant to the login roles of each service.
--
-- * pgqueue_producer enqueues (the Python producer, bulk COPY, pgqueue.enqueue and
--   enqueue_unique in SQL) and follows jobs through pgqueue.job_status: state, attempts,
--   result, errors and progress, never arguments (of any job: ids are not secrets).
--   Of the jobs table it may insert the columns an enqueue sets (a new job is queued,
--   never running, never finished) and read id, task, queue and state (a full queue's
--   depth is counted by the insert's trigger, as the producer). Unique keys go through
--   two functions with their owner's rights, key_holder and take_job_key: it cannot
--   read the keys, which often hold argument values, nor move one. It cannot update or
--   delete a job, claim one, or read any job's arguments.
-- * pgqueue_worker claims, heartbeats, completes, rescues and keeps house: every row of
--   every pgqueue table, read and written, but for the migrations' record and the
--   retention settings, which it only reads. It owns nothing.
-- * pgqueue_observer reads: the tables and views, for dashboards, `pgqueue status`,
--   `/health` and the exporter. It cannot write.
--
-- None owns an object or may create one in the schema, so none can alter it: migrations
-- run as the schema's owner. The roles are the cluster's (a role is not a database's),
-- created here when the migrating role may (CREATEROLE), else by an administrator with
-- `pgqueue roles --create`; the grants are this database's. pgqueue.grant_roles()
-- grants to those that exist; `pgqueue migrate` calls it again after any later
-- migration, so the worker's and the observer's rights reach new tables (a producer's
-- are listed one by one: a migration that gives it more re-creates this function).
-- Functions keep PostgreSQL's default EXECUTE for PUBLIC: they run with the caller's
-- rights, so a role without the rights on the tables gets "permission denied" from
-- inside them. The exceptions, key_holder and take_job_key, are below. The roles are
-- the cluster's: granted pgqueue_producer, a login may enqueue in every database of the
-- cluster where pgqueue is migrated. A role of these names that can log in is left
-- alone (someone else's, not ours to grant to).

create view pgqueue.job_status as
select j.id, j.task, j.queue, j.priority, j.state, j.attempt, j.max_attempts, j.run_at,
       j.created_at, j.started_at, j.finished_at, j.result, j.errors, p.progress
from pgqueue.jobs j
left join pgqueue.job_progress p on p.job_id = j.id;

comment on view pgqueue.job_status is
    'A job''s state, result, errors and progress without its arguments: what a producer may read';

-- Unique keys, for roles that may not read or write pgqueue.job_keys: the holder of a
-- key (null when it is free), and taking a key. Both run with their owner's rights
-- (SECURITY DEFINER, a fixed search_path, every name qualified), only for the roles
-- granted them. take_job_key is 0011's, narrowed: the job must be one the caller has
-- just enqueued (created at this transaction's now(), queued, never started), which is
-- the only job it will remove, giving way to the key's holder; so a caller can neither
-- take a key for a job that is not its new one nor remove any other job.
create function pgqueue.key_holder(p_task text, p_key text)
returns bigint
language sql volatile security definer
set search_path = pg_catalog, pg_temp as $$
    select k.job_id from pgqueue.job_keys k
    where k.task = p_task and k.key = p_key and not pgqueue.job_key_free(k)
$$;

create or replace function pgqueue.take_job_key(p_task text, p_key text, p_job_id bigint, p_window interval default null)
returns table (id bigint, duplicate boolean)
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp as $$
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
    if not exists (select from pgqueue.active_jobs j
                   where j.id = p_job_id and j.created_at = now() and j.state = 'queued' and j.attempt = 0) then
        raise exception 'pgqueue: a unique key goes to a job this transaction enqueued; job % is not one', p_job_id
            using errcode = '22023';
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

revoke execute on function pgqueue.take_job_key(text, text, bigint, interval) from public;
revoke execute on function pgqueue.key_holder(text, text) from public;

-- Roles that enqueue already, by grants of their own: they keep unique keys.
do $$
declare
    v_role name;
begin
    for v_role in
        select distinct grantee from information_schema.role_table_grants
        where table_schema = 'pgqueue' and table_name = 'active_jobs' and privilege_type = 'INSERT'
          and grantee <> 'PUBLIC' and grantee <> current_user
    loop
        execute format('grant execute on function pgqueue.take_job_key(text, text, bigint, interval), '
                       'pgqueue.key_holder(text, text) to %I', v_role);
    end loop;
end
$$;

create function pgqueue.grant_roles(p_create boolean default true)
returns text[]
language plpgsql as $$
declare
    v_role text;
    v_created text[] := '{}';
begin
    if p_create then
        foreach v_role in array array['pgqueue_producer', 'pgqueue_worker', 'pgqueue_observer'] loop
            if not exists (select from pg_roles where rolname = v_role) then
                begin
                    execute format('create role %I nologin', v_role);
                    v_created := v_created || v_role;
                exception
                    when insufficient_privilege then
                        raise notice 'pgqueue: role % not created (this role lacks CREATEROLE): '
                            'an administrator runs `pgqueue roles --create`', v_role;
                    when duplicate_object or unique_violation then
                        null;  -- created meanwhile, by a migration of another database
                end;
            end if;
        end loop;
    end if;
    if exists (select from pg_roles where rolname = 'pgqueue_producer' and not rolcanlogin) then
        grant usage on schema pgqueue to pgqueue_producer;
        grant select on pgqueue.migrations, pgqueue.tasks, pgqueue.job_status to pgqueue_producer;
        grant select (id, task, queue, state),
              insert (id, task, args, queue, priority, run_at, max_attempts, timeout_seconds,
                      backoff, backoff_base_seconds, backoff_max_seconds, backoff_jitter)
            on pgqueue.active_jobs to pgqueue_producer;
        grant select (name, max_depth) on pgqueue.queues to pgqueue_producer;
        grant usage on sequence pgqueue.jobs_id_seq to pgqueue_producer;
        grant execute on function pgqueue.take_job_key(text, text, bigint, interval),
                                  pgqueue.key_holder(text, text) to pgqueue_producer;
    end if;
    if exists (select from pg_roles where rolname = 'pgqueue_worker' and not rolcanlogin) then
        grant usage on schema pgqueue to pgqueue_worker;
        grant select, insert, update, delete on all tables in schema pgqueue to pgqueue_worker;
        revoke insert, update, delete on pgqueue.migrations, pgqueue.retention from pgqueue_worker;
        grant usage, select, update on all sequences in schema pgqueue to pgqueue_worker;
        grant execute on function pgqueue.take_job_key(text, text, bigint, interval),
                                  pgqueue.key_holder(text, text) to pgqueue_worker;
    end if;
    if exists (select from pg_roles where rolname = 'pgqueue_observer' and not rolcanlogin) then
        grant usage on schema pgqueue to pgqueue_observer;
        grant select on all tables in schema pgqueue to pgqueue_observer;
    end if;
    return v_created;
end
$$;

select pgqueue.grant_roles();

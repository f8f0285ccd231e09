-- compatible-with: 1
-- Least-privilege roles: three NOLOGIN roles to grant to the login roles of each service.
--
-- * pgqueue_producer enqueues (the Python producer, bulk COPY, pgqueue.enqueue and
--   enqueue_unique in SQL) and follows its jobs through pgqueue.job_status: state,
--   attempts, result, errors and progress, never arguments. Of the jobs table it may
--   insert rows and read id, task, queue and state (a full queue's depth is counted by
--   the insert's trigger, as the producer). It cannot update or delete a job, claim one,
--   or read any job's arguments.
-- * pgqueue_worker claims, heartbeats, completes, rescues and keeps house: every row of
--   every pgqueue table, read and written. It owns nothing.
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
-- inside them. The one exception, take_job_key, is below.

create view pgqueue.job_status as
select j.id, j.task, j.queue, j.priority, j.state, j.attempt, j.max_attempts, j.run_at,
       j.created_at, j.started_at, j.finished_at, j.result, j.errors, p.progress
from pgqueue.jobs j
left join pgqueue.job_progress p on p.job_id = j.id;

comment on view pgqueue.job_status is
    'A job''s state, result, errors and progress without its arguments: what a producer may read';

-- A producer gives way to a job that took its unique key meanwhile by deleting the job it
-- has just inserted (0011), which it has no right to do. So take_job_key runs with its
-- owner's rights (SECURITY DEFINER, a fixed search_path, every name qualified), and only
-- for the roles granted it. The right it lends is narrow: it removes only a job of the
-- caller's own transaction (created at this transaction's now(), queued, never started),
-- so passing another job's id removes nothing.
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
    insert into pgqueue.job_keys as k (task, key, job_id, expires_at)
    values (p_task, p_key, p_job_id, now() + p_window)
    on conflict (task, key) do update
    set job_id = case when pgqueue.job_key_free(k) then excluded.job_id else k.job_id end,
        expires_at = case when pgqueue.job_key_free(k) then excluded.expires_at else k.expires_at end,
        taken_at = case when pgqueue.job_key_free(k) then now() else k.taken_at end
    returning k.job_id into v_holder;
    if v_holder <> p_job_id then
        delete from pgqueue.active_jobs j
        where j.id = p_job_id and j.created_at = now() and j.state = 'queued' and j.attempt = 0;
    end if;
    return query select v_holder, v_holder <> p_job_id;
end
$$;

revoke execute on function pgqueue.take_job_key(text, text, bigint, interval) from public;

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
    if exists (select from pg_roles where rolname = 'pgqueue_producer') then
        grant usage on schema pgqueue to pgqueue_producer;
        grant select on pgqueue.migrations, pgqueue.tasks, pgqueue.job_status to pgqueue_producer;
        grant select (id, task, queue, state), insert on pgqueue.active_jobs to pgqueue_producer;
        grant select (name, max_depth) on pgqueue.queues to pgqueue_producer;
        grant select, insert, update on pgqueue.job_keys to pgqueue_producer;
        grant usage on sequence pgqueue.jobs_id_seq to pgqueue_producer;
        grant execute on function pgqueue.take_job_key(text, text, bigint, interval) to pgqueue_producer;
    end if;
    if exists (select from pg_roles where rolname = 'pgqueue_worker') then
        grant usage on schema pgqueue to pgqueue_worker;
        grant select, insert, update, delete on all tables in schema pgqueue to pgqueue_worker;
        grant usage, select, update on all sequences in schema pgqueue to pgqueue_worker;
        grant execute on function pgqueue.take_job_key(text, text, bigint, interval) to pgqueue_worker;
    end if;
    if exists (select from pg_roles where rolname = 'pgqueue_observer') then
        grant usage on schema pgqueue to pgqueue_observer;
        grant select on all tables in schema pgqueue to pgqueue_observer;
    end if;
    return v_created;
end
$$;

select pgqueue.grant_roles();

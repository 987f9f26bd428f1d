//! `POST /items` writes, with group commit on PostgreSQL.
//!
//! One row per transaction spends most of PostgreSQL's time on the commit (measured on the
//! 2-core machines: ~300 µs of PostgreSQL CPU per single-row insert, ~65 µs per row in batches
//! of 10). Concurrent inserts are therefore handed to a few writer tasks; each takes whatever
//! is queued (up to `INSERT_BATCH_MAX`) and inserts it in one statement, one commit. A request
//! is answered only after the statement holding its row committed, and each row is matched to
//! its request by position (`WITH ORDINALITY`), never by the order of `RETURNING`. When
//! PostgreSQL refuses a batch, its rows are tried one by one, so each request gets its own
//! outcome; when the connection fails, each gets the 503 a single insert would have got. Under
//! light load a batch is a single row: nothing waits for company.
//!
//! SQLite (one writer at a time) and `INSERT_BATCH_MAX=1` insert directly.

use std::sync::{Arc, OnceLock};

use chrono::{DateTime, Utc};
use sqlx::postgres::PgPool;
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::db::{Db, DbError, Item};

/// One statement, one commit: ids drawn in the CTE, so each row's id is known by position.
const BATCH_SQL: &str = "WITH new AS ( \
       SELECT nextval('items_id_seq') AS id, n, d, ord \
       FROM UNNEST($1::varchar[], $2::varchar[]) WITH ORDINALITY AS t(n, d, ord)), \
     ins AS ( \
       INSERT INTO items (id, name, description) SELECT id, n, d FROM new \
       RETURNING id, created_at) \
     SELECT new.ord, ins.id, ins.created_at FROM ins JOIN new USING (id)";

/// Where `POST /items` rows go.
pub enum ItemWriter {
    Direct(Db),
    Batched(Batcher),
}

pub struct Batcher {
    pool: PgPool,
    tx: mpsc::Sender<Pending>,
    /// Taken by the writer tasks, started on first use (inside the runtime).
    rx: Arc<Mutex<mpsc::Receiver<Pending>>>,
    writers: usize,
    max_batch: usize,
    started: OnceLock<()>,
}

struct Pending {
    name: String,
    description: Option<String>,
    done: oneshot::Sender<Result<Item, DbError>>,
}

impl ItemWriter {
    /// Batched on PostgreSQL when `max_batch > 1`, with `writers` statements in flight.
    pub fn new(db: &Db, max_batch: usize, writers: usize) -> ItemWriter {
        match db {
            Db::Postgres(pool) if max_batch > 1 => {
                let writers = writers.max(1);
                let (tx, rx) = mpsc::channel(writers * max_batch * 2);
                ItemWriter::Batched(Batcher {
                    pool: pool.clone(),
                    tx,
                    rx: Arc::new(Mutex::new(rx)),
                    writers,
                    max_batch,
                    started: OnceLock::new(),
                })
            }
            _ => ItemWriter::Direct(db.clone()),
        }
    }

    /// Insert an item; returns only after its row is committed.
    pub async fn create_item(
        &self,
        name: &str,
        description: Option<&str>,
    ) -> Result<Item, DbError> {
        let b = match self {
            ItemWriter::Direct(db) => return db.create_item(name, description).await,
            ItemWriter::Batched(b) => b,
        };
        b.started.get_or_init(|| {
            for _ in 0..b.writers {
                tokio::spawn(write_loop(b.pool.clone(), b.rx.clone(), b.max_batch));
            }
        });
        let (done, outcome) = oneshot::channel();
        let pending = Pending {
            name: name.to_owned(),
            description: description.map(str::to_owned),
            done,
        };
        if b.tx.send(pending).await.is_err() {
            return Err(DbError::Unavailable(sqlx::Error::PoolClosed));
        }
        outcome
            .await
            .unwrap_or(Err(DbError::Unavailable(sqlx::Error::WorkerCrashed)))
    }
}

/// Take what is queued (waiting only for the first), write it, repeat. The writers share the
/// queue: while one waits on PostgreSQL, the next gathers the rows that arrive meanwhile.
async fn write_loop(pool: PgPool, rx: Arc<Mutex<mpsc::Receiver<Pending>>>, max_batch: usize) {
    loop {
        let batch = {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < max_batch {
                match rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            batch
        };
        // In its own task: should writing ever panic, the batch's requests get 503 (their
        // senders are dropped) and this writer carries on.
        if let Err(e) = tokio::spawn(write_batch(pool.clone(), batch)).await {
            log::error!("insert writer failed: {e}");
        }
    }
}

async fn write_batch(pool: PgPool, batch: Vec<Pending>) {
    if batch.len() > 1 {
        let names: Vec<&str> = batch.iter().map(|p| p.name.as_str()).collect();
        let descriptions: Vec<Option<&str>> =
            batch.iter().map(|p| p.description.as_deref()).collect();
        let rows = sqlx::query_as::<_, (i64, i64, DateTime<Utc>)>(BATCH_SQL)
            .bind(&names)
            .bind(&descriptions)
            .fetch_all(&pool)
            .await;
        match rows {
            Ok(rows) => {
                let mut slots: Vec<Option<Pending>> = batch.into_iter().map(Some).collect();
                for (ord, id, created_at) in rows {
                    let Some(p) = usize::try_from(ord - 1)
                        .ok()
                        .and_then(|i| slots.get_mut(i))
                        .and_then(Option::take)
                    else {
                        continue;
                    };
                    let item = Item {
                        id,
                        name: p.name,
                        description: p.description,
                        created_at,
                    };
                    let _ = p.done.send(Ok(item));
                }
                // Ordinalities are 1..=n, so every slot was filled; one left over would be a
                // bug in the statement, and its request gets an error rather than silence.
                for p in slots.into_iter().flatten() {
                    let _ = p.done.send(Err(DbError::Other(sqlx::Error::RowNotFound)));
                }
                return;
            }
            // PostgreSQL refused the statement: nothing was written, so each row is tried on
            // its own and gets its own answer.
            Err(sqlx::Error::Database(e)) => log::warn!(
                "batched insert of {} rows refused ({e}); inserting one by one",
                batch.len()
            ),
            // Connection trouble: whether it committed is unknown, as for a single insert;
            // every request gets the same answer a single insert would (never re-inserted).
            Err(e) => {
                let unavailable = matches!(DbError::from(e), DbError::Unavailable(_));
                for p in batch {
                    let e = sqlx::Error::Protocol("batched insert failed".into());
                    let _ = p.done.send(Err(if unavailable {
                        DbError::Unavailable(e)
                    } else {
                        DbError::Other(e)
                    }));
                }
                return;
            }
        }
    }
    let db = Db::Postgres(pool);
    for p in batch {
        let r = db.create_item(&p.name, p.description.as_deref()).await;
        let _ = p.done.send(r);
    }
}

//! `taskd store copy --from DIR|URL --to DIR|URL`: a store's state (units, runs and their
//! logs, dispatches, agents and join tokens, events, the audit log, the files kept for `file`
//! units) moved between the embedded store and a PostgreSQL database, either way, ids kept.
//!
//! The two schemas have the same tables and column names; only the types differ (SQLite
//! keeps times as microseconds, flags as integers, JSON as text). Each table is described
//! once ([`TABLES`]), read a page at a time in key order into neutral values ([`Val`]), and
//! written on the other side, all in one transaction there (a copy that fails leaves the
//! destination as it was), the id sequences carried over so that no id is handed out twice.
//! The copy refuses a destination that holds anything, and a source or destination in use: a state directory locked by its
//! daemon, or a database whose lease a server holds.

use std::path::{Path, PathBuf};

use jiff::Timestamp;
use tokio_postgres::types::ToSql;

use crate::error::{Error, Result};

/// A column's type, as both stores keep it.
#[derive(Clone, Copy, PartialEq)]
enum Ty {
    Text,
    /// INTEGER in PostgreSQL.
    I32,
    /// BIGINT in PostgreSQL.
    I64,
    Bool,
    Time,
    Json,
}

/// A table: name, key column (pages go in its order), columns.
struct TableSpec {
    name: &'static str,
    key: &'static str,
    columns: &'static [(&'static str, Ty)],
}

use Ty::*;

/// What is copied, in an order that keeps references whole.
const TABLES: &[TableSpec] = &[
    TableSpec {
        name: "units",
        key: "name",
        columns: &[
            ("name", Text),
            ("definition", Json),
            ("created_at", Time),
            ("updated_at", Time),
            ("paused", Bool),
            ("stopped", Bool),
            ("last_fire", Time),
            ("anchor", Time),
            ("runs_total", I64),
            ("failures_total", I64),
        ],
    },
    TableSpec {
        name: "dispatches",
        key: "id",
        columns: &[
            ("id", I64),
            ("unit", Text),
            ("trigger", Text),
            ("state", Text),
            ("created_at", Time),
            ("ended_at", Time),
            ("total", I32),
            ("batch", I32),
            ("tolerance", I32),
            ("forgiven", I32),
        ],
    },
    TableSpec {
        name: "runs",
        key: "id",
        columns: &[
            ("id", I64),
            ("unit", Text),
            ("state", Text),
            ("trigger", Text),
            ("attempt", I32),
            ("host", Text),
            ("pid", I64),
            ("pid_start", I64),
            ("boot_id", Text),
            ("queued_at", Time),
            ("scheduled_at", Time),
            ("started_at", Time),
            ("ended_at", Time),
            ("exit_code", I32),
            ("signal", I32),
            ("reason", Text),
            ("stdout_bytes", I64),
            ("stderr_bytes", I64),
            ("truncated", Bool),
            ("dispatch", I64),
            ("ignored", Bool),
            ("late_result", Text),
            ("notified", Text),
        ],
    },
    TableSpec {
        name: "agents",
        key: "name",
        columns: &[
            ("name", Text),
            ("secret_hash", Text),
            ("labels", Json),
            ("version", Text),
            ("os", Text),
            ("arch", Text),
            ("max_runs", I32),
            ("created_at", Time),
            ("last_seen", Time),
            ("revoked", Bool),
        ],
    },
    TableSpec {
        name: "join_tokens",
        key: "hash",
        columns: &[("hash", Text), ("expires_at", Time), ("spent_by", Text)],
    },
    TableSpec {
        name: "events",
        key: "seq",
        columns: &[
            ("seq", I64),
            ("time", Time),
            ("kind", Text),
            ("unit", Text),
            ("run", I64),
            ("state", Text),
        ],
    },
    TableSpec {
        name: "audit",
        key: "id",
        columns: &[
            ("id", I64),
            ("time", Time),
            ("peer", Text),
            ("method", Text),
            ("unit", Text),
            ("outcome", Text),
        ],
    },
    TableSpec {
        name: "api_tasks",
        key: "id",
        columns: &[
            ("id", I64),
            ("title", Text),
            ("account", Text),
            ("timeout", I64),
            ("hosts", Json),
            ("script", Text),
            ("args", Text),
            ("creator", Text),
            ("created", Time),
            ("added", Bool),
        ],
    },
];

/// Rows per page.
const PAGE: usize = 1000;

/// A value on its way between the stores.
#[derive(Debug, Clone, PartialEq)]
enum Val {
    Null,
    Int(i64),
    Text(String),
    Bool(bool),
    /// Microseconds since the epoch.
    Time(i64),
}

/// A store to copy from or to.
pub enum Place {
    /// The embedded store in this state directory.
    Dir(PathBuf),
    /// A PostgreSQL database.
    Url(String),
}

impl Place {
    /// A `postgres://` URL, or else a state directory.
    pub fn parse(s: &str) -> Place {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Place::Url(s.to_string())
        } else {
            Place::Dir(PathBuf::from(s))
        }
    }

    fn describe(&self) -> String {
        match self {
            Place::Dir(d) => d.display().to_string(),
            Place::Url(u) => u.split('@').next_back().unwrap_or(u).to_string(),
        }
    }
}

/// How many rows of each table, and run logs, a copy moved.
#[derive(Debug, Default, PartialEq)]
pub struct Copied {
    /// `(table, rows)`, in copy order.
    pub tables: Vec<(&'static str, usize)>,
    /// Run logs.
    pub logs: usize,
    /// Files kept for `file` units.
    pub files: usize,
}

impl std::fmt::Display for Copied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.tables.iter().map(|(t, n)| format!("{n} {t}")).collect();
        write!(f, "{}, {} run logs, {} files", parts.join(", "), self.logs, self.files)
    }
}

/// One side of a copy, open.
enum Side {
    Sqlite {
        conn: rusqlite::Connection,
        logs: PathBuf,
        /// The kept files' directory.
        files: PathBuf,
        _lock: crate::state_dir::StateLock,
    },
    Pg(tokio_postgres::Client),
}

/// Copies everything from `from` into `to` (which must hold no units or runs).
pub async fn copy(from: &Place, to: &Place) -> Result<Copied> {
    let src = open(from, false).await?;
    let mut dst = open(to, true).await?;
    for (what, side) in [("source", &src), ("destination", &dst)] {
        if let Side::Pg(c) = side {
            let held = c
                .query_opt("SELECT holder FROM lease WHERE expires_at > clock_timestamp()", &[])
                .await?;
            if let Some(r) = held {
                return Err(Error::Conflict(format!(
                    "the {what} database is in use: server {} holds its lease; stop its servers \
                     first",
                    r.get::<_, String>(0)
                )));
            }
        }
    }
    let tables: Vec<String> =
        TABLES.iter().map(|t| format!("(SELECT COUNT(*) FROM {})", t.name)).collect();
    let present = count(&dst, &format!("SELECT {}", tables.join(" + "))).await?;
    if present > 0 {
        return Err(Error::Conflict(format!(
            "{} already holds units, runs or other state: copy into an empty store",
            to.describe()
        )));
    }
    let high = high_water(&src).await?;
    // All of it or nothing: one transaction on the destination.
    match &mut dst {
        Side::Sqlite { conn, .. } => conn.execute_batch("BEGIN IMMEDIATE")?,
        Side::Pg(c) => c.batch_execute("BEGIN").await?,
    }
    let mut copied = Copied::default();
    for t in TABLES {
        let mut after: Option<Val> = None;
        let mut n = 0;
        loop {
            let page = read_page(&src, t, after.as_ref()).await?;
            if page.is_empty() {
                break;
            }
            n += page.len();
            after = page.last().map(|r| r[key_index(t)].clone());
            let ids: Vec<i64> = match t.name {
                "runs" => page
                    .iter()
                    .filter_map(|r| if let Val::Int(id) = r[0] { Some(id) } else { None })
                    .collect(),
                _ => Vec::new(),
            };
            write_page(&mut dst, t, page).await?;
            copied.logs += copy_logs(&src, &mut dst, &ids).await?;
        }
        copied.tables.push((t.name, n));
    }
    // Ids handed out next come after any the source ever handed out (deleted ones too).
    for (table, col) in SEQUENCES {
        let hw = high.iter().find(|(t, _)| t == table).map_or(0, |(_, n)| *n);
        match &mut dst {
            Side::Pg(c) => {
                c.execute(
                    &format!(
                        "SELECT setval(pg_get_serial_sequence('{table}', '{col}'), \
                         GREATEST((SELECT MAX({col}) FROM {table}), $1, 1))"
                    ),
                    &[&hw],
                )
                .await?;
            }
            Side::Sqlite { conn, .. } => {
                conn.execute(
                    "UPDATE sqlite_sequence SET seq = MAX(seq, ?2) WHERE name = ?1",
                    rusqlite::params![table, hw],
                )?;
                conn.execute(
                    "INSERT INTO sqlite_sequence(name, seq) SELECT ?1, ?2 \
                     WHERE ?2 > 0 AND NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = ?1)",
                    rusqlite::params![table, hw],
                )?;
            }
        }
    }
    copied.files = copy_files(&src, &mut dst).await?;
    match &mut dst {
        Side::Sqlite { conn, .. } => conn.execute_batch("COMMIT")?,
        Side::Pg(c) => c.batch_execute("COMMIT").await?,
    }
    Ok(copied)
}

/// Copies the files kept for `file` units; how many. One piece of a file in memory at a
/// time. (Into a directory, a file is written aside and renamed: a copy that fails later
/// leaves it, which is harmless, as its name is its checksum.)
async fn copy_files(src: &Side, dst: &mut Side) -> Result<usize> {
    use super::postgres::files::PIECE;
    let kept = kept_files(src).await?;
    for (sha, size) in &kept {
        let pieces = (*size as usize).div_ceil(PIECE) as i32;
        let mut from = Pieces::open(src, sha)?;
        match dst {
            Side::Sqlite { files, .. } => {
                let io = |e: std::io::Error| Error::io(&*files, e);
                std::fs::create_dir_all(&*files).map_err(io)?;
                let tmp = files.join(format!(".copy-{sha}"));
                let mut f = std::fs::File::create(&tmp).map_err(io)?;
                for n in 0..pieces {
                    std::io::Write::write_all(&mut f, &from.piece(n).await?).map_err(io)?;
                }
                f.sync_all().map_err(io)?;
                std::fs::rename(&tmp, files.join(sha)).map_err(io)?;
                std::fs::File::open(&*files).and_then(|d| d.sync_all()).map_err(io)?;
            }
            Side::Pg(c) => {
                c.execute(
                    "INSERT INTO files(sha256, size, kept_at) VALUES ($1, $2, now()) \
                     ON CONFLICT DO NOTHING",
                    &[sha, size],
                )
                .await?;
                for n in 0..pieces {
                    let piece = from.piece(n).await?;
                    c.execute(
                        "INSERT INTO file_pieces(sha256, n, data) VALUES ($1, $2, $3) \
                         ON CONFLICT DO NOTHING",
                        &[sha, &n, &piece],
                    )
                    .await?;
                }
            }
        }
    }
    Ok(kept.len())
}

/// The files `side` keeps: checksum and size.
async fn kept_files(side: &Side) -> Result<Vec<(String, i64)>> {
    Ok(match side {
        Side::Sqlite { files, .. } => match std::fs::read_dir(files) {
            Ok(entries) => entries
                .flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let size = e.metadata().ok()?.len() as i64;
                    super::content::is_sha256(&name).then_some((name, size))
                })
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(Error::io(files, e)),
        },
        Side::Pg(c) => c
            .query("SELECT sha256, size FROM files ORDER BY sha256", &[])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect(),
    })
}

/// A kept file read a piece at a time, in order.
enum Pieces<'a> {
    File(std::fs::File, PathBuf),
    Pg(&'a tokio_postgres::Client, &'a str),
}

impl<'a> Pieces<'a> {
    fn open(side: &'a Side, sha: &'a str) -> Result<Pieces<'a>> {
        Ok(match side {
            Side::Sqlite { files, .. } => {
                let path = files.join(sha);
                Pieces::File(std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?, path)
            }
            Side::Pg(c) => Pieces::Pg(c, sha),
        })
    }

    /// Piece `n` (the next one).
    async fn piece(&mut self, n: i32) -> Result<Vec<u8>> {
        use super::postgres::files::PIECE;
        match self {
            Pieces::File(f, path) => {
                let mut buf = Vec::with_capacity(PIECE);
                std::io::Read::read_to_end(
                    &mut std::io::Read::take(&mut *f, PIECE as u64),
                    &mut buf,
                )
                .map_err(|e| Error::io(&*path, e))?;
                Ok(buf)
            }
            Pieces::Pg(c, sha) => Ok(c
                .query_one("SELECT data FROM file_pieces WHERE sha256 = $1 AND n = $2", &[sha, &n])
                .await?
                .get(0)),
        }
    }
}

/// The tables whose ids the store hands out, and their id column.
const SEQUENCES: [(&str, &str); 5] =
    [("runs", "id"), ("dispatches", "id"), ("events", "seq"), ("audit", "id"), ("api_tasks", "id")];

/// The highest id the source ever handed out, per table of [`SEQUENCES`].
async fn high_water(side: &Side) -> Result<Vec<(String, i64)>> {
    let mut out = Vec::new();
    for (table, col) in SEQUENCES {
        let n: i64 = match side {
            Side::Sqlite { conn, .. } => conn.query_row(
                "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = ?1), 0)",
                [table],
                |r| r.get(0),
            )?,
            Side::Pg(c) => {
                let seq: String = c
                    .query_one(&format!("SELECT pg_get_serial_sequence('{table}', '{col}')"), &[])
                    .await?
                    .get(0);
                let r =
                    c.query_one(&format!("SELECT last_value, is_called FROM {seq}"), &[]).await?;
                let n = if r.get::<_, bool>(1) { r.get(0) } else { 0 };
                if table == "events" {
                    // Numbered by the lease holder, not by the identity (store::postgres).
                    let numbered: i64 = c
                        .query_one(
                            "SELECT GREATEST((SELECT COALESCE(MAX(seq), 0) FROM events), \
                             (SELECT COALESCE(MAX(value::bigint), 0) FROM cluster_settings \
                             WHERE key = $1))",
                            &[&super::postgres::events::KEPT_AS],
                        )
                        .await?
                        .get(0);
                    n.max(numbered)
                } else {
                    n
                }
            }
        };
        out.push((table.to_string(), n));
    }
    Ok(out)
}

fn key_index(t: &TableSpec) -> usize {
    t.columns.iter().position(|(c, _)| *c == t.key).expect("the key is a column")
}

async fn open(p: &Place, create: bool) -> Result<Side> {
    match p {
        Place::Dir(dir) => {
            if !create && !dir.join("taskd.db").exists() {
                return Err(Error::Conflict(format!("{}: no taskd store here", dir.display())));
            }
            // Creates (or migrates) the schema, as a daemon starting there would.
            drop(super::Store::open(dir)?);
            let lock = crate::state_dir::lock(dir).map_err(|e| {
                Error::Conflict(format!("{}: {e} (stop its daemon first)", dir.display()))
            })?;
            let conn = rusqlite::Connection::open(dir.join("taskd.db"))?;
            conn.busy_timeout(std::time::Duration::from_secs(5))?;
            let (logs, files) = (dir.join("logs"), dir.join("files"));
            Ok(Side::Sqlite { conn, logs, files, _lock: lock })
        }
        Place::Url(url) => {
            let target = super::postgres::target_of(url)?;
            let (mut c, conn) = target.cfg.connect(target.tls).await?;
            tokio::spawn(conn);
            super::postgres::schema::migrate(&mut c).await?;
            Ok(Side::Pg(c))
        }
    }
}

async fn count(side: &Side, sql: &str) -> Result<i64> {
    match side {
        Side::Sqlite { conn, .. } => Ok(conn.query_row(sql, [], |r| r.get(0))?),
        Side::Pg(c) => Ok(c.query_one(sql, &[]).await?.get(0)),
    }
}

async fn read_page(side: &Side, t: &TableSpec, after: Option<&Val>) -> Result<Vec<Vec<Val>>> {
    let cols: Vec<&str> = t.columns.iter().map(|(c, _)| *c).collect();
    match side {
        Side::Sqlite { conn, .. } => {
            let cols: Vec<String> = t
                .columns
                .iter()
                .map(|(c, _)| match *c {
                    // Older embedded stores may lack it.
                    "anchor" => "COALESCE(anchor, updated_at)".to_string(),
                    c => c.to_string(),
                })
                .collect();
            let filter =
                if after.is_some() { format!("WHERE {} > ?1", t.key) } else { String::new() };
            let sql = format!(
                "SELECT {} FROM {} {filter} ORDER BY {} LIMIT {PAGE}",
                cols.join(", "),
                t.name,
                t.key
            );
            let mut st = conn.prepare(&sql)?;
            let map = |r: &rusqlite::Row<'_>| {
                (0..t.columns.len())
                    .map(|i| {
                        use rusqlite::types::ValueRef;
                        Ok(match r.get_ref(i)? {
                            ValueRef::Null => Val::Null,
                            ValueRef::Integer(n) => match t.columns[i].1 {
                                Bool => Val::Bool(n != 0),
                                Time => Val::Time(n),
                                _ => Val::Int(n),
                            },
                            ValueRef::Real(x) => Val::Int(x as i64),
                            ValueRef::Text(s) | ValueRef::Blob(s) => {
                                Val::Text(String::from_utf8_lossy(s).into_owned())
                            }
                        })
                    })
                    .collect::<rusqlite::Result<Vec<Val>>>()
            };
            let rows = match after {
                Some(Val::Int(k)) => st.query_map([k], map)?.collect::<rusqlite::Result<_>>()?,
                Some(Val::Text(k)) => st.query_map([k], map)?.collect::<rusqlite::Result<_>>()?,
                _ => st.query_map([], map)?.collect::<rusqlite::Result<_>>()?,
            };
            Ok(rows)
        }
        Side::Pg(c) => {
            let filter =
                if after.is_some() { format!("WHERE {} > $1", t.key) } else { String::new() };
            let sql = format!(
                "SELECT {} FROM {} {filter} ORDER BY {} LIMIT {PAGE}",
                cols.join(", "),
                t.name,
                t.key
            );
            let rows = match after {
                Some(Val::Int(k)) => c.query(&sql, &[k]).await?,
                Some(Val::Text(k)) => c.query(&sql, &[k]).await?,
                _ => c.query(&sql, &[]).await?,
            };
            Ok(rows
                .iter()
                .map(|r| {
                    t.columns
                        .iter()
                        .enumerate()
                        .map(|(i, (_, ty))| match ty {
                            Text => r.get::<_, Option<String>>(i).map_or(Val::Null, Val::Text),
                            I32 => {
                                r.get::<_, Option<i32>>(i).map_or(Val::Null, |n| Val::Int(n.into()))
                            }
                            I64 => r.get::<_, Option<i64>>(i).map_or(Val::Null, Val::Int),
                            Bool => r.get::<_, Option<bool>>(i).map_or(Val::Null, Val::Bool),
                            Time => r
                                .get::<_, Option<Timestamp>>(i)
                                .map_or(Val::Null, |t| Val::Time(t.as_microsecond())),
                            Json => r
                                .get::<_, Option<serde_json::Value>>(i)
                                .map_or(Val::Null, |v| Val::Text(v.to_string())),
                        })
                        .collect()
                })
                .collect())
        }
    }
}

async fn write_page(side: &mut Side, t: &TableSpec, rows: Vec<Vec<Val>>) -> Result<()> {
    let cols: Vec<&str> = t.columns.iter().map(|(c, _)| *c).collect();
    match side {
        Side::Sqlite { conn, .. } => {
            let marks: Vec<String> = (1..=cols.len()).map(|i| format!("?{i}")).collect();
            let sql = format!(
                "INSERT INTO {}({}) VALUES ({})",
                t.name,
                cols.join(", "),
                marks.join(", ")
            );
            let mut st = conn.prepare_cached(&sql)?;
            for row in rows {
                let values = row.into_iter().map(|v| match v {
                    Val::Null => rusqlite::types::Value::Null,
                    Val::Int(n) | Val::Time(n) => rusqlite::types::Value::Integer(n),
                    Val::Bool(b) => rusqlite::types::Value::Integer(b.into()),
                    Val::Text(s) => rusqlite::types::Value::Text(s),
                });
                st.execute(rusqlite::params_from_iter(values))?;
            }
            Ok(())
        }
        Side::Pg(c) => {
            let marks: Vec<String> = (1..=cols.len()).map(|i| format!("${i}")).collect();
            let sql = format!(
                "INSERT INTO {}({}) VALUES ({})",
                t.name,
                cols.join(", "),
                marks.join(", ")
            );
            let st = c.prepare(&sql).await?;
            for row in rows {
                let params: Vec<Box<dyn ToSql + Sync + Send>> = row
                    .into_iter()
                    .zip(t.columns)
                    .map(|(v, (col, ty))| pg_value(v, *ty, col))
                    .collect::<Result<_>>()?;
                let refs: Vec<&(dyn ToSql + Sync)> =
                    params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect();
                c.execute(&st, &refs).await?;
            }
            Ok(())
        }
    }
}

/// `v` as PostgreSQL takes a column of type `ty`.
fn pg_value(v: Val, ty: Ty, col: &str) -> Result<Box<dyn ToSql + Sync + Send>> {
    let bad = || Error::Conflict(format!("column {col}: a value of an unexpected type"));
    Ok(match (ty, v) {
        (Text, Val::Null) => Box::new(None::<String>),
        (I32, Val::Null) => Box::new(None::<i32>),
        (I64, Val::Null) => Box::new(None::<i64>),
        (Bool, Val::Null) => Box::new(None::<bool>),
        (Time, Val::Null) => Box::new(None::<Timestamp>),
        (Json, Val::Null) => Box::new(None::<serde_json::Value>),
        (Text, Val::Text(s)) => Box::new(s),
        (I32, Val::Int(n)) => Box::new(i32::try_from(n).map_err(|_| bad())?),
        (I64, Val::Int(n)) => Box::new(n),
        (Bool, Val::Bool(b)) => Box::new(b),
        (Bool, Val::Int(n)) => Box::new(n != 0),
        (Time, Val::Time(n) | Val::Int(n)) => {
            Box::new(Timestamp::from_microsecond(n).map_err(|_| bad())?)
        }
        (Json, Val::Text(s)) => {
            Box::new(serde_json::from_str::<serde_json::Value>(&s).map_err(|_| bad())?)
        }
        _ => return Err(bad()),
    })
}

/// Copies the logs of runs `ids` (already copied); how many there were. One log in memory
/// at a time.
async fn copy_logs(src: &Side, dst: &mut Side, ids: &[i64]) -> Result<usize> {
    let mut n = 0;
    for &id in ids {
        let data = match src {
            Side::Sqlite { logs, .. } => match std::fs::read(super::logs::path_in(logs, id)) {
                Ok(d) => d,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io(super::logs::path_in(logs, id), e)),
            },
            Side::Pg(c) => {
                let rows = c
                    .query("SELECT off, data FROM run_logs WHERE run = $1 ORDER BY off", &[&id])
                    .await?;
                super::postgres::logs::assemble(
                    rows.iter().map(|r| (r.get::<_, i64>(0), r.get::<_, &[u8]>(1))),
                )
            }
        };
        if data.is_empty() {
            continue;
        }
        match dst {
            Side::Sqlite { logs, .. } => write_log(logs, id, &data)?,
            Side::Pg(c) => {
                for (i, piece) in data.chunks(1 << 20).enumerate() {
                    let off = (i << 20) as i64;
                    c.execute(
                        "INSERT INTO run_logs(run, off, data) VALUES ($1, $2, $3)",
                        &[&id, &off, &piece],
                    )
                    .await?;
                }
            }
        }
        n += 1;
    }
    Ok(n)
}

fn write_log(dir: &Path, id: i64, data: &[u8]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = super::logs::path_in(dir, id);
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    std::io::Write::write_all(&mut f, data).map_err(|e| Error::io(&path, e))
}

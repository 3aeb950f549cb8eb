//! Files kept for `file` units (SPEC §10.7) in PostgreSQL, so that every server of a cluster
//! reads what any of them kept: `files` (checksum, size) and `file_pieces`, the content in
//! pieces of [`PIECE`] bytes.
//!
//! A file is kept in one fenced transaction (its row and all its pieces, or nothing: no server
//! ever reads half a file), streamed from the upload's temporary file a piece at a time; a
//! file kept already is left as it is (its name is its checksum). Reads take the one or two
//! pieces a range touches. Neither holds more than two pieces in memory.

use std::path::Path;
use std::sync::Arc;

use deadpool_postgres::Pool;
use tokio::io::AsyncReadExt;

use super::{Shared, begin};
use crate::error::{Error, Result};

/// Bytes in a piece (the last one of a file holds the rest).
pub const PIECE: usize = 1 << 20;

/// The kept files' tables.
pub(in crate::store) struct FileTable {
    pool: Pool,
    shared: Arc<Shared>,
}

impl FileTable {
    pub(super) fn new(pool: Pool, shared: Arc<Shared>) -> FileTable {
        FileTable { pool, shared }
    }

    /// Keeps the `size` bytes of `path` as file `sha256` (their checksum), unless it is kept
    /// already.
    pub async fn keep(&self, sha256: &str, path: &Path, size: u64) -> Result<()> {
        let mut c = self.pool.get().await?;
        let t = begin(&mut c, &self.shared).await?;
        let fresh = t
            .execute(
                "INSERT INTO files(sha256, size, kept_at) VALUES ($1, $2, now()) \
                 ON CONFLICT DO NOTHING",
                &[&sha256, &(size as i64)],
            )
            .await?;
        if fresh == 1 {
            let mut f = tokio::fs::File::open(path).await.map_err(|e| Error::io(path, e))?;
            let mut piece = Vec::with_capacity(PIECE);
            for n in 0..size.div_ceil(PIECE as u64) as i32 {
                piece.clear();
                (&mut f)
                    .take(PIECE as u64)
                    .read_to_end(&mut piece)
                    .await
                    .map_err(|e| Error::io(path, e))?;
                t.execute(
                    "INSERT INTO file_pieces(sha256, n, data) VALUES ($1, $2, $3)",
                    &[&sha256, &n, &piece],
                )
                .await?;
            }
        }
        t.commit().await
    }

    /// The size of file `sha256`, if it is kept.
    pub async fn size(&self, sha256: &str) -> Result<Option<u64>> {
        let c = self.pool.get().await?;
        let row = c.query_opt("SELECT size FROM files WHERE sha256 = $1", &[&sha256]).await?;
        Ok(row.map(|r| r.get::<_, i64>(0) as u64))
    }

    /// At most `len` bytes of kept file `sha256` from `offset`; fewer only at its end.
    pub async fn read(&self, sha256: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let Some(size) = self.size(sha256).await? else {
            return Err(Error::invalid("sha256", "no such file is kept here"));
        };
        let end = size.min(offset.saturating_add(len as u64));
        if offset >= end {
            return Ok(Vec::new());
        }
        let (first, last) = ((offset / PIECE as u64) as i32, ((end - 1) / PIECE as u64) as i32);
        let c = self.pool.get().await?;
        let rows = c
            .query(
                "SELECT n, data FROM file_pieces WHERE sha256 = $1 AND n BETWEEN $2 AND $3 \
                 ORDER BY n",
                &[&sha256, &first, &last],
            )
            .await?;
        let mut out = Vec::with_capacity((end - offset) as usize);
        for r in &rows {
            let at = r.get::<_, i32>(0) as u64 * PIECE as u64;
            let data: &[u8] = r.get(1);
            let from = offset.saturating_sub(at) as usize;
            let to = ((end - at) as usize).min(data.len());
            out.extend_from_slice(&data[from.min(to)..to]);
        }
        if out.len() as u64 != end - offset {
            return Err(Error::Postgres(format!("file sha256:{sha256} is missing pieces")));
        }
        Ok(out)
    }
}

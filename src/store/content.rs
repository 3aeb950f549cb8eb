//! Files the daemon keeps for `file` units (SPEC §10.7): content-addressed by SHA-256 under
//! `<state-dir>/files`, or, on a PostgreSQL store, in the database, where every server of a
//! cluster reads them ([`super::postgres::files`]); so that later fires and redos need no
//! client, and a file pushed twice is kept once.
//!
//! Mechanism: an upload ([`Content::begin`]) is a private temporary file in that directory,
//! appended in order ([`Content::append`], each piece at most [`CHUNK_MAX`]) while its SHA-256
//! is computed; [`Content::commit`] checks the size, syncs it and renames it to its checksum
//! (or copies it into the database and deletes it). Hosts read it back in pieces
//! ([`Content::read`]). Nothing holds a whole file in memory.
//!
//! Invariants and limits:
//! - a file is at most [`MAX_SIZE`]; at most [`MAX_UPLOADS`] uploads are open at once, and one
//!   left idle for [`UPLOAD_IDLE`] is dropped (its temporary file deleted) to make room;
//! - a committed file is never changed: its name is its checksum;
//! - kept files are not deleted when no unit names them any more (see the README's limits);
//! - a file a commit keeps in the database was synced nowhere on this machine: the database's
//!   commit is what makes it durable.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::postgres::files::FileTable;
use crate::error::{Error, Result};

/// The largest file kept.
pub const MAX_SIZE: u64 = 1 << 30;
/// The largest piece appended or read at once.
pub const CHUNK_MAX: usize = 1 << 20;
/// Uploads open at once, at most.
pub const MAX_UPLOADS: usize = 8;
/// An upload untouched this long may be dropped.
pub const UPLOAD_IDLE: Duration = Duration::from_secs(600);

/// An upload under way.
struct Upload {
    path: PathBuf,
    size: u64,
    written: u64,
    hasher: Sha256,
    touched: Instant,
}

/// The daemon's kept files.
pub struct Content {
    /// Uploads under way, and the kept files when they are not in the database.
    dir: PathBuf,
    uploads: Mutex<HashMap<u64, Option<Upload>>>,
    next: AtomicU64,
    /// Where the files are kept, on a PostgreSQL store.
    table: Option<FileTable>,
}

impl std::fmt::Debug for Upload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upload").field("size", &self.size).field("written", &self.written).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Whether `s` is a SHA-256 in lowercase hex.
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl Content {
    /// The kept files in `dir` (created 0700 if missing); uploads a crash left are deleted.
    pub fn open(dir: &Path) -> Result<Content> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| Error::io(dir, e))?;
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?.flatten() {
            if entry.file_name().to_string_lossy().starts_with(".upload-") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(Content {
            dir: dir.to_path_buf(),
            uploads: Mutex::default(),
            next: AtomicU64::new(1),
            table: None,
        })
    }

    /// The same, keeping files in `table` (a PostgreSQL store's) rather than in the directory.
    pub(super) fn kept_in(self, table: FileTable) -> Content {
        Content { table: Some(table), ..self }
    }

    /// The path of kept file `sha256`.
    fn path(&self, sha256: &str) -> Result<PathBuf> {
        if !is_sha256(sha256) {
            return Err(Error::invalid("sha256", "expected 64 lowercase hex digits"));
        }
        Ok(self.dir.join(sha256))
    }

    /// The size of kept file `sha256`, if it is kept.
    pub async fn size(&self, sha256: &str) -> Result<Option<u64>> {
        let path = self.path(sha256)?;
        match &self.table {
            Some(table) => table.size(sha256).await,
            None => Ok(std::fs::metadata(path).ok().map(|m| m.len())),
        }
    }

    /// Opens an upload of `size` bytes: its id.
    pub fn begin(&self, size: u64) -> Result<u64> {
        if size > MAX_SIZE {
            return Err(Error::invalid("size", format!("at most {MAX_SIZE} bytes (1 GiB)")));
        }
        let mut uploads = lock(&self.uploads);
        if uploads.len() >= MAX_UPLOADS {
            let idle: Vec<u64> = uploads
                .iter()
                .filter(|(_, u)| u.as_ref().is_some_and(|u| u.touched.elapsed() > UPLOAD_IDLE))
                .map(|(id, _)| *id)
                .collect();
            for id in idle {
                if let Some(Some(u)) = uploads.remove(&id) {
                    let _ = std::fs::remove_file(&u.path);
                }
            }
            if uploads.len() >= MAX_UPLOADS {
                return Err(Error::Limit(format!(
                    "{MAX_UPLOADS} uploads are under way; try again when one is done"
                )));
            }
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!(".upload-{id}-{}", std::process::id()));
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let up = Upload { path, size, written: 0, hasher: Sha256::new(), touched: Instant::now() };
        uploads.insert(id, Some(up));
        Ok(id)
    }

    /// Takes upload `id` out of the table while it is written to (one writer at a time).
    fn take(&self, id: u64) -> Result<Upload> {
        match lock(&self.uploads).get_mut(&id) {
            Some(slot) => slot
                .take()
                .ok_or_else(|| Error::Conflict(format!("upload {id} is being written to"))),
            None => Err(Error::invalid("upload", format!("no upload {id} (finished, or dropped)"))),
        }
    }

    fn put_back(&self, id: u64, up: Upload) {
        if let Some(slot) = lock(&self.uploads).get_mut(&id) {
            *slot = Some(up);
        }
    }

    /// Appends `data` at `offset` (where the upload is) to upload `id`: the bytes written.
    pub async fn append(&self, id: u64, offset: u64, data: Vec<u8>) -> Result<u64> {
        let mut up = self.take(id)?;
        let check = if offset != up.written {
            Err(Error::invalid("offset", format!("the upload is at byte {}", up.written)))
        } else if data.len() > CHUNK_MAX {
            Err(Error::invalid("data", format!("at most {CHUNK_MAX} bytes a piece")))
        } else if up.written + data.len() as u64 > up.size {
            Err(Error::invalid("data", format!("beyond the upload's size of {} bytes", up.size)))
        } else {
            Ok(())
        };
        if let Err(e) = check {
            self.put_back(id, up);
            return Err(e);
        }
        up.hasher.update(&data);
        let path = up.path.clone();
        let written = tokio::task::spawn_blocking(move || {
            let mut f = std::fs::OpenOptions::new().append(true).open(&path)?;
            f.write_all(&data)?;
            Ok::<_, std::io::Error>(data.len() as u64)
        })
        .await
        .map_err(|e| Error::Storage(e.to_string()))?;
        match written {
            Ok(n) => {
                up.written += n;
                up.touched = Instant::now();
                let total = up.written;
                self.put_back(id, up);
                Ok(total)
            }
            Err(e) => {
                // A failed write leaves the file in doubt: the upload is dropped.
                lock(&self.uploads).remove(&id);
                let _ = std::fs::remove_file(&up.path);
                Err(Error::io(&up.path, e))
            }
        }
    }

    /// Finishes upload `id`: checks its size, keeps it under its checksum, and answers that.
    pub async fn commit(&self, id: u64) -> Result<String> {
        let up = self.take(id)?;
        if up.written != up.size {
            let why = format!("{} of {} bytes were sent", up.written, up.size);
            self.put_back(id, up);
            return Err(Error::invalid("upload", why));
        }
        lock(&self.uploads).remove(&id);
        let sha = hex(&up.hasher.finalize());
        if let Some(table) = &self.table {
            let kept = table.keep(&sha, &up.path, up.size).await;
            let _ = tokio::fs::remove_file(&up.path).await;
            return kept.map(|()| sha);
        }
        let (from, to, dir) = (up.path.clone(), self.dir.join(&sha), self.dir.clone());
        tokio::task::spawn_blocking(move || {
            std::fs::File::open(&from)?.sync_all()?;
            std::fs::rename(&from, &to)?;
            std::fs::File::open(&dir)?.sync_all()
        })
        .await
        .map_err(|e| Error::Storage(e.to_string()))?
        .map_err(|e| {
            let _ = std::fs::remove_file(&up.path);
            Error::io(&up.path, e)
        })?;
        Ok(sha)
    }

    /// At most `len` (≤ [`CHUNK_MAX`]) bytes of kept file `sha256` from `offset`; fewer only at
    /// its end.
    pub async fn read(&self, sha256: &str, offset: u64, len: usize) -> Result<Vec<u8>> {
        let path = self.path(sha256)?;
        let len = len.min(CHUNK_MAX);
        if let Some(table) = &self.table {
            return table.read(sha256, offset, len).await;
        }
        tokio::task::spawn_blocking(move || {
            let mut f = std::fs::File::open(&path).map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Error::invalid("sha256", "no such file is kept here")
                } else {
                    Error::io(&path, e)
                }
            })?;
            f.seek(SeekFrom::Start(offset)).map_err(|e| Error::io(&path, e))?;
            let mut buf = Vec::with_capacity(len);
            f.take(len as u64).read_to_end(&mut buf).map_err(|e| Error::io(&path, e))?;
            Ok(buf)
        })
        .await
        .map_err(|e| Error::Storage(e.to_string()))?
    }
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_upload_is_kept_under_its_checksum_and_read_back_in_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let c = Content::open(dir.path()).unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let id = c.begin(data.len() as u64).unwrap();
        let mut at = 0;
        for piece in data.chunks(100_000) {
            at = c.append(id, at, piece.to_vec()).await.unwrap();
        }
        // Out of order, or beyond the size: refused, nothing changed.
        assert!(c.append(id, 5, vec![1]).await.is_err());
        assert!(c.append(id, at, vec![1]).await.is_err());
        let sha = c.commit(id).await.unwrap();
        assert_eq!(sha, hex(&Sha256::digest(&data)));
        assert_eq!(c.size(&sha).await.unwrap(), Some(data.len() as u64));
        let mut back = Vec::new();
        while back.len() < data.len() {
            back.extend(c.read(&sha, back.len() as u64, 70_000).await.unwrap());
        }
        assert_eq!(back, data);
        assert!(c.read(&sha, data.len() as u64, 10).await.unwrap().is_empty());
        assert!(c.commit(id).await.is_err(), "committed once");
    }

    #[tokio::test]
    async fn a_short_upload_is_not_kept_and_uploads_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let c = Content::open(dir.path()).unwrap();
        let id = c.begin(10).unwrap();
        c.append(id, 0, vec![0; 5]).await.unwrap();
        assert!(c.commit(id).await.is_err());
        assert!(c.begin(MAX_SIZE + 1).is_err());
        for _ in 1..MAX_UPLOADS {
            c.begin(1).unwrap();
        }
        assert!(matches!(c.begin(1), Err(Error::Limit(_))));
        // A restart forgets them, and their files.
        drop(c);
        let _ = Content::open(dir.path()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}

//! The file executor (SPEC §10.7): puts a file the server keeps at a unit's `file.dest` on
//! this host, for a run of a `file` unit.
//!
//! Mechanism: the destination's directory is resolved and checked as a `cwd` is (it must
//! exist, and lie under `allowed_dirs` when they are set). If a file with the same SHA-256 is
//! there already, the run succeeds with reason `unchanged` (its mode and owner are set as
//! asked) without a write. Otherwise the content is read from the server in pieces of
//! [`CHUNK`] bytes ([`RunSink::read_content`]) into a private temporary file beside the
//! destination (`.<name>.taskd-<run>.tmp`) while its SHA-256 is computed; once the size and
//! checksum match, the file is synced, given its mode and owner, renamed over the destination
//! and the directory synced. The run's output says what was written (bytes and checksum).
//!
//! Invariants and limits:
//! - the destination is only ever replaced whole by a rename: a reader, or a crash, never sees
//!   half a file there (a crash leaves at most the temporary file, which the next put of that
//!   destination removes; a put holds a lock on its temporary file while it writes, taken
//!   under the directory's lock with the file's creation, so puts of one destination side by
//!   side leave each other's alone, and the last rename wins);
//! - at most [`READ_AHEAD`] + 1 pieces are in memory at a time, whatever the file's size (at
//!   most 1 GiB);
//! - stopping a run (cancel, timeout) removes its temporary file.

use std::io::Read;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use super::RunSink;
use crate::store::content::{MAX_SIZE, hex};
use crate::unit::definition::{FileSpec, ValidateCtx};

/// Bytes asked of the server at once.
pub const CHUNK: usize = 1 << 20;
/// Pieces asked for ahead of the one being written.
const READ_AHEAD: usize = 3;

/// How a put ended.
#[derive(Debug, PartialEq)]
pub enum Put {
    /// The file was written: its size.
    Written(u64),
    /// The same content was there already.
    Unchanged,
    /// It could not be put there: why.
    Failed(String),
    /// The run was stopped.
    Stopped,
}

/// The regular file at `path`, open for reading, and its SHA-256 (read in pieces); `None` if
/// there is none (or something else is there: a symlink, a FIFO, a directory, which the
/// rename replaces or refuses, and which are never opened: a FIFO would block the open).
fn sha256_of(path: &Path) -> Option<(String, std::fs::File)> {
    let mut f = open_regular(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match f.read(&mut buf) {
            Ok(0) => return Some((hex(&h.finalize()), f)),
            Ok(n) => h.update(&buf[..n]),
            Err(_) => return None,
        }
    }
}

/// The regular file at `path`, open for reading; `None` for anything else. A symlink is not
/// followed (`O_NOFOLLOW` fails on it) and a FIFO is not waited on (`O_NONBLOCK`: its open
/// returns at once, and it is no regular file).
fn open_regular(path: &Path) -> Option<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    f.metadata().ok()?.is_file().then_some(f)
}

/// Gives `file` (at `path`) its mode and owner, through its descriptor: whatever is put at
/// `path` meanwhile (a symlink to somewhere else) is not what changes.
fn set_mode_and_owner(file: &std::fs::File, path: &Path, spec: &FileSpec) -> Result<(), String> {
    file.set_permissions(std::fs::Permissions::from_mode(spec.mode))
        .map_err(|e| format!("cannot set the mode of {}: {e}", path.display()))?;
    if let Some((user, group)) = &spec.owner {
        let u = crate::exec::User::lookup(user).map_err(|e| e.to_string())?;
        let gid = match group {
            None => u.gid,
            Some(g) => {
                let found = match g.parse::<u32>() {
                    Ok(id) => nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(id)),
                    Err(_) => nix::unistd::Group::from_name(g),
                };
                found
                    .map_err(|e| format!("group {g:?}: {e}"))?
                    .ok_or_else(|| format!("no such group: {g:?}"))?
                    .gid
                    .as_raw()
            }
        };
        let (uid, gid) = (nix::unistd::Uid::from_raw(u.uid), nix::unistd::Gid::from_raw(gid));
        std::os::unix::fs::fchown(file, Some(uid.as_raw()), Some(gid.as_raw()))
            .map_err(|e| format!("cannot give {} to {user}: {e}", path.display()))?;
    }
    Ok(())
}

/// Where `spec` goes on this host: its directory resolved and allowed, and the file's name.
fn destination(spec: &FileSpec, validate: &ValidateCtx) -> Result<(PathBuf, String), String> {
    let name = spec.dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let parent = spec.dest.parent().unwrap_or(Path::new("/"));
    let dir = validate.resolve_cwd(parent).map_err(|e| match e {
        crate::error::Error::Invalid { reason, .. } => format!("dest: {reason}"),
        other => format!("dest: {other}"),
    })?;
    Ok((dir, name))
}

/// Takes `f`'s exclusive lock without waiting: whether it was free. A put holds the lock on
/// its temporary file while it writes, so a temporary file whose lock is free was left by a
/// put that ended without cleaning up (a crash).
fn lock_free(f: &std::fs::File) -> bool {
    try_flock(f, libc::LOCK_EX)
}

/// Takes `f`'s flock `op` (`LOCK_SH`, `LOCK_EX`) without waiting: whether it was had.
fn try_flock(f: &std::fs::File, op: libc::c_int) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor this function borrows; no memory is involved.
    unsafe { libc::flock(f.as_raw_fd(), op | libc::LOCK_NB) == 0 }
}

/// `dir` open and flock'ed with `op` (`LOCK_SH`, `LOCK_EX`), tried for up to 5 s; `None` if
/// it could not be had. A put creates and locks its temporary file under the directory's
/// lock shared, and [`remove_leftovers`] takes it exclusively: a temporary file just created
/// by a put beside it, not locked yet, is never taken for a leftover.
fn dir_lock(dir: &Path, op: libc::c_int) -> Option<std::fs::File> {
    let d = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)
        .ok()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if try_flock(&d, op) {
            return Some(d);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Removes what earlier puts of `name` into `dir` left (temporary files nobody writes to).
fn remove_leftovers(dir: &Path, name: &str) {
    let Some(_dir) = dir_lock(dir, libc::LOCK_EX) else { return };
    let prefix = format!(".{name}.taskd-");
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(&prefix)
                && n.ends_with(".tmp")
                && open_regular(&e.path()).is_some_and(|f| lock_free(&f))
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Puts `spec`'s file in place for run `run`, its content read through `sink`.
pub async fn put<S: RunSink>(
    sink: &S,
    validate: &ValidateCtx,
    run: i64,
    spec: &FileSpec,
    stop: &CancellationToken,
) -> Put {
    let (spec2, validate2) = (spec.clone(), validate.clone());
    let checked = tokio::task::spawn_blocking(move || {
        let (dir, name) = destination(&spec2, &validate2)?;
        let dest = dir.join(&name);
        if let Some((sum, file)) = sha256_of(&dest)
            && sum == spec2.sha256
        {
            set_mode_and_owner(&file, &dest, &spec2)?;
            return Ok(None);
        }
        remove_leftovers(&dir, &name);
        Ok(Some((dir, name)))
    })
    .await;
    let (dir, name) = match checked {
        Ok(Ok(Some(place))) => place,
        Ok(Ok(None)) => return Put::Unchanged,
        Ok(Err(why)) => return Put::Failed(why),
        Err(e) => return Put::Failed(e.to_string()),
    };
    let tmp = dir.join(format!(".{name}.taskd-{run}.tmp"));
    let outcome = write_and_place(sink, run, spec, &tmp, &dir.join(&name), stop).await;
    if !matches!(outcome, Put::Written(_)) {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    outcome
}

async fn write_and_place<S: RunSink>(
    sink: &S,
    run: i64,
    spec: &FileSpec,
    tmp: &Path,
    dest: &Path,
    stop: &CancellationToken,
) -> Put {
    let tmp2 = tmp.to_path_buf();
    let created = tokio::task::spawn_blocking(move || {
        // Created and locked under the directory's lock (see `dir_lock`).
        let _dir = tmp2.parent().and_then(|d| dir_lock(d, libc::LOCK_SH));
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp2).map(|f| {
            // Locked while it is written: another put of the same destination leaves it
            // alone.
            let locked = lock_free(&f);
            (f, locked)
        })
    })
    .await;
    let mut file = match created {
        Ok(Ok((f, true))) => tokio::fs::File::from_std(f),
        Ok(Ok(_)) => return Put::Failed(format!("cannot lock {}", tmp.display())),
        Ok(Err(e)) => return Put::Failed(format!("cannot create {}: {e}", tmp.display())),
        Err(e) => return Put::Failed(e.to_string()),
    };
    let mut h = Sha256::new();
    let mut offset = 0u64;
    // The next pieces are asked for while one is written: a round trip to the server per
    // piece would leave the disk (and the network) idle half the time.
    let pieces = futures_util::stream::iter((0u64..).map(|i| i * CHUNK as u64))
        .map(|at| sink.read_content(run, &spec.sha256, at, CHUNK))
        .buffered(READ_AHEAD);
    tokio::pin!(pieces);
    loop {
        let piece = tokio::select! {
            p = pieces.next() => p,
            () = stop.cancelled() => return Put::Stopped,
        };
        let piece = match piece {
            Some(Ok(p)) => p,
            Some(Err(e)) => {
                return Put::Failed(format!("cannot read the file from the server: {e}"));
            }
            None => break,
        };
        h.update(&piece);
        if let Err(e) = file.write_all(&piece).await {
            return Put::Failed(format!("cannot write {}: {e}", tmp.display()));
        }
        offset += piece.len() as u64;
        if offset > MAX_SIZE {
            return Put::Failed("the file is larger than 1 GiB".into());
        }
        // A short piece is the last.
        if piece.len() < CHUNK {
            break;
        }
    }
    let got = hex(&h.finalize());
    if got != spec.sha256 {
        return Put::Failed(format!("checksum mismatch: got sha256:{got}"));
    }
    if let Err(e) = file.sync_all().await {
        return Put::Failed(format!("cannot sync {}: {e}", tmp.display()));
    }
    // Kept open (and locked) until it is renamed.
    let file = file.into_std().await;
    let (tmp2, dest2, spec2) = (tmp.to_path_buf(), dest.to_path_buf(), spec.clone());
    let placed = tokio::task::spawn_blocking(move || {
        set_mode_and_owner(&file, &tmp2, &spec2)?;
        std::fs::rename(&tmp2, &dest2)
            .map_err(|e| format!("cannot rename into {}: {e}", dest2.display()))?;
        drop(file);
        if let Some(dir) = dest2.parent() {
            let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
        }
        Ok::<_, String>(())
    })
    .await;
    match placed {
        Ok(Ok(())) => Put::Written(offset),
        Ok(Err(why)) => Put::Failed(why),
        Err(e) => Put::Failed(e.to_string()),
    }
}

//! The state directory before the daemon uses it: created private, refused when others can
//! read it, locked against a second daemon, and the address file that tells `taskctl` where
//! the daemon listens.
//!
//! The directory holds the token, the database (with every unit's `env`) and every run's
//! output, so it is the daemon's secret as a whole: mode 0700, owned by the daemon's account,
//! and every file in it 0600. A directory that another account owns, or that group or others
//! may enter, is refused at start with the command that fixes it, rather than silently
//! changed: the daemon cannot know whether the looser mode was a mistake or whether secrets
//! already leaked through it. Directories and files *inside* a private state directory are
//! tightened at start (their contents were never reachable by others, so nothing leaked):
//! state directories made by earlier versions have 0755 subdirectories and 0644 files.
//!
//! Limits: files under `logs/` are not walked at start (a million run logs would slow every
//! start); the 0700 `logs/` directory is what keeps them private.

use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The file in the state directory that holds the address the daemon listens on, so that
/// `taskctl` finds a daemon started with `--listen 127.0.0.1:0`.
pub const ADDRESS_FILE: &str = "address";

/// The lock file held by the running daemon.
pub const LOCK_FILE: &str = "taskd.lock";

/// Subdirectories the daemon creates in the state directory.
pub const SUBDIRS: [&str; 4] = ["logs", "units", "work", "scripts"];

/// Files directly in the state directory that hold the daemon's data, tightened at start
/// (not the token: a token others could read is refused instead, since it may have leaked).
const PRIVATE_FILES: [&str; 5] =
    ["taskd.db", "taskd.db-wal", "taskd.db-shm", ADDRESS_FILE, LOCK_FILE];

/// How long a locked state directory is waited for before giving up.
const LOCK_WAIT: Duration = Duration::from_secs(1);

/// Why the state directory cannot be used, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    /// Another account owns the directory (or its token).
    #[error(
        "{path} belongs to uid {owner}, not to this daemon's account (uid {me}): use a state \
         directory of your own (--state-dir), or `chown -R {me} {path}`"
    )]
    Owner {
        /// The directory or file.
        path: String,
        /// Its owner.
        owner: u32,
        /// The daemon's effective uid.
        me: u32,
    },
    /// Group or others may read or enter it.
    #[error(
        "{path} is open to other accounts (mode {mode:04o}): it holds the API token and every \
         run's output; run `chmod {want:o} {path}`"
    )]
    Open {
        /// The directory or file.
        path: String,
        /// Its permission bits.
        mode: u32,
        /// The mode it should have.
        want: u32,
    },
    /// A token file too short to be a secret.
    #[error(
        "{path} holds a token of {len} bytes; at least 32 are needed: delete the file to have a \
         new token generated, or write a longer one"
    )]
    ShortToken {
        /// The token file.
        path: String,
        /// Its length, whitespace trimmed.
        len: usize,
    },
    /// Another daemon holds the directory.
    #[error("another taskd is already using {path}; stop it or pass a different --state-dir")]
    Locked {
        /// The state directory.
        path: String,
    },
    /// The file system said no.
    #[error("{path}: {source}")]
    Io {
        /// The directory or file.
        path: String,
        /// The underlying error.
        source: io::Error,
    },
}

fn io_err(path: &Path, source: io::Error) -> StateDirError {
    StateDirError::Io { path: path.display().to_string(), source }
}

/// Checks that `meta` (of `path`) belongs to this account and is closed to group and others.
fn check_private(path: &Path, meta: &std::fs::Metadata, want: u32) -> Result<(), StateDirError> {
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(StateDirError::Owner {
            path: path.display().to_string(),
            owner: meta.uid(),
            me,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(StateDirError::Open { path: path.display().to_string(), mode, want });
    }
    Ok(())
}

/// Tightens `path` to `mode` when it is looser; missing paths are left alone.
fn tighten(path: &Path, mode: u32) -> Result<(), StateDirError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_symlink() && meta.mode() & 0o077 != 0 => {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .map_err(|e| io_err(path, e))?;
            tracing::info!(path = %path.display(), from = format!("{:o}", meta.mode() & 0o777),
                to = format!("{mode:o}"), "made private");
            Ok(())
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path, e)),
    }
}

/// Makes `dir` ready for the daemon: creates it (mode 0700, parents too) when missing,
/// refuses it when another account owns it or others may enter it, creates the
/// subdirectories, and tightens what an earlier version left readable inside it.
pub fn prepare(dir: &Path) -> Result<(), StateDirError> {
    match std::fs::metadata(dir) {
        Ok(meta) => check_private(dir, &meta, 0o700)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| io_err(dir, e))?;
        }
        Err(e) => return Err(io_err(dir, e)),
    }
    for sub in SUBDIRS {
        let path = dir.join(sub);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&path)
            .map_err(|e| io_err(&path, e))?;
        tighten(&path, 0o700)?;
    }
    for file in PRIVATE_FILES {
        tighten(&dir.join(file), 0o600)?;
    }
    Ok(())
}

/// Holds the state directory for this daemon: a second daemon on the same directory fails.
#[derive(Debug)]
pub struct StateLock {
    _lock: nix::fcntl::Flock<std::fs::File>,
}

/// Locks the state directory (which [`prepare`] made ready).
pub fn lock(dir: &Path) -> Result<StateLock, StateDirError> {
    let path = dir.join(LOCK_FILE);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| io_err(&path, e))?;
    // A daemon killed while starting a child leaves that child holding the lock until it
    // execs, a moment later: wait that moment out before calling the directory taken.
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(StateLock { _lock: lock }),
            Err((back, _)) if Instant::now() < deadline => {
                f = back;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(_) => return Err(StateDirError::Locked { path: dir.display().to_string() }),
        }
    }
}

/// Reads the API token from `<dir>/token`, or creates that file (mode 0600) with 32 random
/// bytes, hex-encoded, when it is missing. An existing token must be private to this account
/// and at least 32 bytes long.
pub fn load_or_create_token(dir: &Path) -> Result<String, StateDirError> {
    let path = dir.join("token");
    match std::fs::read_to_string(&path) {
        Ok(existing) => {
            let meta = std::fs::metadata(&path).map_err(|e| io_err(&path, e))?;
            check_private(&path, &meta, 0o600)?;
            let token = existing.trim();
            if token.len() < 32 {
                return Err(StateDirError::ShortToken {
                    path: path.display().to_string(),
                    len: token.len(),
                });
            }
            return Ok(token.to_owned());
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&path, e)),
    }

    let token = random_hex(32).map_err(|e| io_err(Path::new("/dev/urandom"), e))?;
    write_private(dir, "token", format!("{token}\n").as_bytes())?;
    Ok(token)
}

/// `n` random bytes from the kernel, hex-encoded: tokens, credentials, join tokens.
pub fn random_hex(n: usize) -> io::Result<String> {
    let mut bytes = vec![0u8; n];
    getrandom(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

/// Writes `<dir>/<name>` whole with mode 0600: a private temporary file, synced, renamed into
/// place, so no reader ever sees half of it and it is never readable by others.
pub fn write_private(dir: &Path, name: &str, data: &[u8]) -> Result<PathBuf, StateDirError> {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let write = || -> io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(data)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_err(&path, e)
    })?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).expect("stat").mode() & 0o777
    }

    #[test]
    fn a_new_state_directory_is_private() {
        let top = tempfile::tempdir().expect("tempdir");
        let dir = top.path().join("a/b/state");
        prepare(&dir).expect("prepare");
        assert_eq!(mode(&dir), 0o700);
        for sub in SUBDIRS {
            assert_eq!(mode(&dir.join(sub)), 0o700, "{sub}");
        }
        let token = load_or_create_token(&dir).expect("token");
        assert_eq!(token.len(), 64);
        assert_eq!(mode(&dir.join("token")), 0o600);
        assert_eq!(load_or_create_token(&dir).expect("again"), token);
    }

    #[test]
    fn an_open_state_directory_is_refused_with_the_fix() {
        let top = tempfile::tempdir().expect("tempdir");
        let dir = top.path();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let e = prepare(dir).expect_err("0755 refused").to_string();
        assert!(e.contains("mode 0755") && e.contains("chmod 700"), "{e}");
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        // What an earlier version left readable inside is tightened.
        std::fs::create_dir(dir.join("logs")).expect("mkdir");
        std::fs::set_permissions(dir.join("logs"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::fs::write(dir.join("taskd.db"), "").expect("db");
        std::fs::set_permissions(dir.join("taskd.db"), std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        prepare(dir).expect("prepare");
        assert_eq!(mode(&dir.join("logs")), 0o700);
        assert_eq!(mode(&dir.join("taskd.db")), 0o600);
    }

    #[test]
    fn a_weak_token_is_refused() {
        let top = tempfile::tempdir().expect("tempdir");
        let dir = top.path();
        let token = dir.join("token");
        std::fs::write(&token, "short\n").expect("write");
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let e = load_or_create_token(dir).expect_err("short").to_string();
        assert!(e.contains("5 bytes") && e.contains("at least 32"), "{e}");
        std::fs::write(&token, "x".repeat(40)).expect("write");
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        let e = load_or_create_token(dir).expect_err("open").to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(load_or_create_token(dir).expect("ok"), "x".repeat(40));
    }
}

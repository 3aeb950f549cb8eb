//! Script files of `script` units: written where the run's interpreter can read them and
//! nobody else can change them, removed when the run ends. The executing host's business:
//! an agent writes them in its own state directory.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Writes a script run's text where its interpreter, given the path, can read it, and
/// returns that path:
/// - for a run as the daemon's own account (`owner` `None`), `<dir>/<run id>` (`dir` is
///   `scripts/` in the state directory), mode 0600;
/// - for a run as another account (`owner` its uid and gid), which cannot enter the state
///   directory (0700), a file only that account (and root) can read, in the daemon's temp
///   directory (`script_for`).
///
/// Remove it with [`remove`] when the run ends.
pub async fn write(dir: &Path, run: i64, text: &str, owner: Option<(u32, u32)>) -> Result<PathBuf> {
    let dir = dir.to_owned();
    let text = text.to_string();
    tokio::task::spawn_blocking(move || match owner {
        None => own_script(&dir, run, &text),
        Some((uid, gid)) => script_for(&std::env::temp_dir(), run, &text, uid, gid),
    })
    .await
    .map_err(|_| Error::ShuttingDown)?
}

/// Removes a script written by [`write`]. Not awaited.
pub fn remove(path: PathBuf) {
    tokio::task::spawn_blocking(move || {
        let _ = std::fs::remove_file(path);
    });
}

/// `<dir>/<run>`, mode 0600: the interpreter is given the script's path (no exec bit needed),
/// and only the daemon's account reads it.
fn own_script(dir: &Path, run: i64, text: &str) -> Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let path = dir.join(run.to_string());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    std::io::Write::write_all(&mut f, text.as_bytes()).map_err(|e| Error::io(&path, e))?;
    Ok(path)
}

/// A script for a run as account `uid`: `<tmp>/taskd-script-<run>-<random>`, created with
/// `O_EXCL|O_NOFOLLOW` (nothing planted under that name beforehand, file or symlink, is
/// opened: another random name is tried), then handed to the account read-only (0400) through
/// the open file. In a sticky directory (`/tmp`) nobody else can then rename or remove it.
fn script_for(tmp: &Path, run: i64, text: &str, uid: u32, gid: u32) -> Result<PathBuf> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    for _ in 0..16 {
        let path = tmp.join(format!("taskd-script-{run}-{:016x}", random_u64()));
        let mut f = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io(&path, e)),
        };
        let written = std::io::Write::write_all(&mut f, text.as_bytes())
            .and_then(|()| std::os::unix::fs::fchown(&f, Some(uid), Some(gid)))
            .and_then(|()| f.set_permissions(std::fs::Permissions::from_mode(0o400)));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&path);
            return Err(Error::io(&path, e));
        }
        return Ok(path);
    }
    Err(Error::io(
        tmp,
        std::io::Error::new(std::io::ErrorKind::AlreadyExists, "no free name for a script"),
    ))
}

/// 64 random bits from the kernel (or, should getrandom fail, from the time and the pid).
fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into the buffer it is given.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n == bytes.len() as isize {
        return u64::from_ne_bytes(bytes);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    now ^ u64::from(std::process::id()).rotate_left(32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_script_for_another_account_is_that_accounts_to_read_only() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        // Root hands it to nobody; anyone else can only hand it to themselves.
        let (uid, gid) = match nix::unistd::User::from_name("nobody") {
            Ok(Some(u)) if nix::unistd::geteuid().is_root() => (u.uid.as_raw(), u.gid.as_raw()),
            _ => (nix::unistd::getuid().as_raw(), nix::unistd::getgid().as_raw()),
        };
        let path = script_for(tmp.path(), 7, "echo hi\n", uid, gid).unwrap();
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("taskd-script-7-") && name.len() == 31, "{name}");
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o7777), (uid, gid, 0o400));
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "echo hi\n");
        // Another run's script never gets the same name.
        assert_ne!(script_for(tmp.path(), 7, "", uid, gid).unwrap(), path);
    }
}

//! Replacing a file so that a crash at any instant leaves either the old or the new one,
//! complete, and no temporary file that outlives its writer for long.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::file::{describe, io, kind_of};
use crate::error::Error;

/// Writes `bytes` to `path` atomically and durably.
///
/// **What is replaced.** A regular file at `path`, or a new file if there is none. Anything
/// else is refused with an [`Error::Io`] (`op` = `"replace"`) that says what it is, and left
/// alone: a directory, a FIFO, a character or block device, a socket. A symbolic link is
/// followed: the file it leads to (through any chain of links) is replaced, in *its*
/// directory, and the link stays and leads to the new file; a link that leads nowhere
/// (dangling) or to anything but a regular file is refused. (Replacing the link itself
/// would silently cut whatever it was set up to share, and a link is how checkpoints are
/// commonly put on another disk.) The check is made when the call starts.
///
/// **How.** In the directory of the file replaced, so that the final rename stays within
/// one file system:
///
/// 1. a temporary file is created and locked (`flock`): on Linux an unnamed one
///    (`O_TMPFILE`), elsewhere, or where the file system has no unnamed files, one named
///    `.{name}.{16 hex digits}.tmp` (`O_EXCL`);
/// 2. `bytes` are written to it and it is `fsync`ed, so its contents are on disk before
///    any name points at them;
/// 3. an unnamed file is then linked under such a name; the named file is renamed over the
///    target (atomic on POSIX file systems; `MoveFileEx` with `MOVEFILE_REPLACE_EXISTING`
///    on Windows), and only then unlocked;
/// 4. the directory is `fsync`ed (Unix), so the rename itself survives a power loss.
///
/// A process killed anywhere in 1–3 leaves the target as it was. It leaves a temporary
/// file behind only if killed between its naming and the rename (on Linux, the instant
/// between the link and the rename; elsewhere, the whole write). Each call first removes
/// the temporary files of the same target that are *provably abandoned*: named as above,
/// regular files, and not locked, so their writer is dead (a live writer holds the lock
/// from before the name exists until after the rename; the named fallback checks, once
/// locked, that its file still has a name). So killed saves never leave more than the
/// temporaries of the saves killed since the last call started. On Windows nothing is
/// cleaned up. An error in 1–3 removes the temporary file and leaves the target as it was.
/// An error in 4 is reported although the target already holds the new contents (they
/// may not survive a power loss). A directory `fsync` that the file system does not
/// support (`EINVAL`) is not an error. The new file keeps the permission bits of the file
/// it replaces; a new one gets `0o644` less the umask (Unix). Other hard links to the
/// replaced file keep the old contents.
///
/// ```
/// let dir = std::env::temp_dir().join(format!("lamb-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("notes.txt");
/// lamb_std::checkpoint::write_atomic(&path, b"first")?;
/// lamb_std::checkpoint::write_atomic(&path, b"second")?;
/// assert_eq!(std::fs::read(&path).unwrap(), b"second");
/// // A directory is not replaced.
/// let e = lamb_std::checkpoint::write_atomic(&dir, b"third").unwrap_err();
/// assert!(e.to_string().ends_with("it is a directory, not a regular file"), "{e}");
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), lamb_std::Error>(())
/// ```
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<(), Error> {
    let target = Target::resolve(path.as_ref())?;
    replace(&target, bytes)?;
    sync_dir(&target.dir)
}

/// The file a write replaces.
struct Target {
    /// `path`, or the file its symbolic link leads to.
    path: PathBuf,
    /// Its directory.
    dir: PathBuf,
    /// Its file name.
    name: OsString,
    /// The permission bits of the file replaced; `None` for a new file.
    #[cfg_attr(not(unix), allow(dead_code))]
    mode: Option<u32>,
}

impl Target {
    fn resolve(path: &Path) -> Result<Target, Error> {
        let refuse = |kind, message: String| Error::Io {
            path: path.to_path_buf(),
            op: "replace",
            kind,
            message,
        };
        let (resolved, existing) = match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (path.to_path_buf(), None),
            Err(e) => return Err(io(path, "look up", e)),
            Ok(md) if md.file_type().is_symlink() => {
                let to = std::fs::read_link(path)
                    .map_or_else(|_| "?".into(), |l| l.display().to_string());
                match std::fs::metadata(path) {
                    Ok(md) if md.is_file() => {
                        let real = std::fs::canonicalize(path)
                            .map_err(|e| io(path, "follow the symbolic link", e))?;
                        (real, Some(md))
                    }
                    Ok(md) => {
                        let ft = md.file_type();
                        return Err(refuse(
                            kind_of(ft),
                            format!(
                                "it is a symbolic link to '{to}', which is {}, not a regular \
                                 file",
                                describe(ft)
                            ),
                        ));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Err(refuse(
                            e.kind(),
                            format!("it is a symbolic link to '{to}', which does not exist"),
                        ));
                    }
                    Err(e) => {
                        return Err(refuse(
                            e.kind(),
                            format!(
                                "it is a symbolic link to '{to}', which cannot be followed: {e}"
                            ),
                        ));
                    }
                }
            }
            Ok(md) if !md.is_file() => {
                let ft = md.file_type();
                return Err(refuse(
                    kind_of(ft),
                    format!("it is {}, not a regular file", describe(ft)),
                ));
            }
            Ok(md) => (path.to_path_buf(), Some(md)),
        };
        let name = resolved.file_name().ok_or_else(|| Error::Io {
            path: path.to_path_buf(),
            op: "write",
            kind: std::io::ErrorKind::InvalidInput,
            message: "the path names no file".into(),
        })?;
        let dir = match resolved.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        #[cfg(unix)]
        let mode = {
            use std::os::unix::fs::PermissionsExt;
            existing.map(|md| md.permissions().mode() & 0o7777)
        };
        #[cfg(not(unix))]
        let mode = existing.map(|_| 0);
        Ok(Target {
            name: name.to_os_string(),
            path: resolved,
            dir,
            mode,
        })
    }
}

#[cfg(unix)]
use unix::replace;

#[cfg(unix)]
mod unix {
    use std::ffi::{OsStr, OsString};
    use std::fs::{File, OpenOptions};
    use std::hash::{BuildHasher, Hasher};
    use std::io::Write;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    use std::path::{Path, PathBuf};

    use super::{Target, io};
    use crate::error::Error;

    /// Hex digits of the random part of a temporary file's name.
    const RANDOM_DIGITS: usize = 16;

    /// `.{name}.{16 lowercase hex digits}.tmp`.
    fn temp_name(name: &OsStr) -> OsString {
        // `RandomState` draws fresh random keys per process and a new state per call.
        let mut h = std::hash::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        let mut out = OsString::from(".");
        out.push(name);
        out.push(format!(".{:016x}.tmp", h.finish()));
        out
    }

    /// Whether `candidate` is a temporary file name of target `name`.
    fn is_temp_name(candidate: &OsStr, name: &OsStr) -> bool {
        let (c, n) = (candidate.as_bytes(), name.as_bytes());
        let Some(rest) = c
            .strip_prefix(b".")
            .and_then(|r| r.strip_prefix(n))
            .and_then(|r| r.strip_prefix(b"."))
            .and_then(|r| r.strip_suffix(b".tmp"))
        else {
            return false;
        };
        rest.len() == RANDOM_DIGITS && rest.iter().all(|b| b.is_ascii_hexdigit())
    }

    /// Removes the temporary files of target `name` in `dir` whose writer is dead: regular
    /// files (not followed if links) that nobody holds locked. Best effort: a file that
    /// cannot be opened, locked or removed is left.
    pub(super) fn remove_abandoned(dir: &Path, name: &OsStr) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            if !is_temp_name(&entry.file_name(), name) {
                continue;
            }
            let path = entry.path();
            // O_NOFOLLOW: never through a link; O_NONBLOCK: a FIFO under such a name
            // cannot block the open.
            let Ok(file) = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
                .open(&path)
            else {
                continue;
            };
            let Ok(md) = file.metadata() else { continue };
            // Locked: a live writer (or a file system without locks: keep it).
            if !md.is_file() || file.try_lock().is_err() {
                continue;
            }
            // Removed while still locked by us, and only if the name is still this file.
            if std::fs::symlink_metadata(&path)
                .is_ok_and(|now| now.dev() == md.dev() && now.ino() == md.ino())
            {
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    /// Permission bits of the new file: those of the file replaced, exactly.
    fn set_mode(file: &File, target: &Target) -> std::io::Result<()> {
        match target.mode {
            Some(mode) => file.set_permissions(std::fs::Permissions::from_mode(mode)),
            None => Ok(()),
        }
    }

    fn write_and_sync(file: &mut File, target: &Target, bytes: &[u8]) -> Result<(), Error> {
        set_mode(file, target).map_err(|e| io(&target.path, "set the permissions for", e))?;
        file.write_all(bytes)
            .map_err(|e| io(&target.path, "write the temporary file for", e))?;
        file.sync_all()
            .map_err(|e| io(&target.path, "fsync the temporary file for", e))
    }

    /// Renames the (locked) temporary file `temp` over the target, then unlocks it; on an
    /// error, removes it.
    fn rename_into_place(file: File, temp: &Path, target: &Target) -> Result<(), Error> {
        let renamed = std::fs::rename(temp, &target.path);
        if renamed.is_err() {
            let _ = std::fs::remove_file(temp);
        }
        drop(file);
        renamed.map_err(|e| io(&target.path, "rename the temporary file over", e))
    }

    pub(in super::super) fn replace(target: &Target, bytes: &[u8]) -> Result<(), Error> {
        remove_abandoned(&target.dir, &target.name);
        #[cfg(target_os = "linux")]
        if let Some(mut file) = linux::unnamed(target) {
            write_and_sync(&mut file, target, bytes)?;
            if let Some(temp) = linux::link(&file, target) {
                return rename_into_place(file, &temp, target);
            }
            // No way to name it here (no /proc): write a named file instead.
        }
        let (mut file, temp) = named(target)?;
        if let Err(e) = write_and_sync(&mut file, target, bytes) {
            let _ = std::fs::remove_file(&temp);
            return Err(e);
        }
        rename_into_place(file, &temp, target)
    }

    /// Creates and locks a new named temporary file.
    fn named(target: &Target) -> Result<(File, PathBuf), Error> {
        let mut last = None;
        for _ in 0..16 {
            let temp = target.dir.join(temp_name(&target.name));
            let created = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&temp);
            let file = match created {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io(&target.dir, "create a temporary file in", e)),
            };
            // Between the create and the lock, `remove_abandoned` in another process may
            // have taken it for abandoned: it unlinks under the lock, so once we hold the
            // lock, a file with no name left is such a one. Start again.
            if file.lock().is_ok() && file.metadata().is_ok_and(|m| m.nlink() == 0) {
                last = Some(temp);
                continue;
            }
            return Ok((file, temp));
        }
        Err(io(
            last.as_deref().unwrap_or(&target.dir),
            "create a temporary file in",
            std::io::Error::other("no unused temporary file name after 16 tries"),
        ))
    }

    #[cfg(target_os = "linux")]
    mod linux {
        use std::ffi::CString;
        use std::fs::{File, OpenOptions};
        use std::os::unix::ffi::OsStrExt;
        use std::os::unix::fs::OpenOptionsExt;
        use std::os::unix::io::AsRawFd;
        use std::path::PathBuf;

        use super::{Target, temp_name};

        /// A new unnamed file in the target's directory, locked; `None` where the file
        /// system (or kernel) has no `O_TMPFILE`, or any other failure: the named path
        /// then reports the error in its terms.
        pub(super) fn unnamed(target: &Target) -> Option<File> {
            let file = OpenOptions::new()
                .write(true)
                .mode(0o644)
                .custom_flags(libc::O_TMPFILE)
                .open(&target.dir)
                .ok()?;
            // Nobody else can see it yet: the lock is ours before it has a name.
            let _ = file.lock();
            Some(file)
        }

        /// Gives the unnamed `file` a temporary name in the target's directory; `None` if
        /// that cannot be done here.
        pub(super) fn link(file: &File, target: &Target) -> Option<PathBuf> {
            let proc_path = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd())).ok()?;
            for _ in 0..16 {
                let temp = target.dir.join(temp_name(&target.name));
                let c_temp = CString::new(temp.as_os_str().as_bytes()).ok()?;
                // SAFETY: both paths are NUL-terminated strings that outlive the call;
                // AT_FDCWD with absolute or cwd-relative paths. Linking /proc/self/fd/N
                // with AT_SYMLINK_FOLLOW names the open file (the documented way for an
                // O_TMPFILE file without CAP_DAC_READ_SEARCH).
                let rc = unsafe {
                    libc::linkat(
                        libc::AT_FDCWD,
                        proc_path.as_ptr(),
                        libc::AT_FDCWD,
                        c_temp.as_ptr(),
                        libc::AT_SYMLINK_FOLLOW,
                    )
                };
                if rc == 0 {
                    return Some(temp);
                }
                if std::io::Error::last_os_error().kind() != std::io::ErrorKind::AlreadyExists {
                    return None;
                }
            }
            None
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn temporary_names_are_recognised_exactly() {
            let name = OsStr::new("ckpt.safetensors");
            let t = temp_name(name);
            assert!(is_temp_name(&t, name), "{t:?}");
            assert_ne!(temp_name(name), t);
            for other in [
                "ckpt.safetensors",
                ".ckpt.safetensors.tmp",
                ".ckpt.safetensors.0123456789abcdef",
                ".ckpt.safetensors.0123456789abcde.tmp",
                ".ckpt.safetensors.0123456789abcdeg.tmp",
                ".ckpt.safetensorsX0123456789abcdef.tmp",
                ".other.0123456789abcdef.tmp",
                ".ckpt.safetensors.abc123.tmp",
            ] {
                assert!(!is_temp_name(OsStr::new(other), name), "{other}");
            }
        }
    }
}

/// Elsewhere: a named temporary file, no cleanup of abandoned ones.
#[cfg(not(unix))]
fn replace(target: &Target, bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(&target.name);
    prefix.push(".");
    let mut tmp = tempfile::Builder::new()
        .prefix(&prefix)
        .suffix(".tmp")
        .tempfile_in(&target.dir)
        .map_err(|e| io(&target.dir, "create a temporary file in", e))?;
    // From here, dropping `tmp` on an error deletes the temporary file.
    tmp.as_file_mut()
        .write_all(bytes)
        .map_err(|e| io(tmp.path(), "write", e))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| io(tmp.path(), "fsync", e))?;
    tmp.persist(&target.path)
        .map_err(|e| io(&target.path, "rename the temporary file over", e.error))?;
    Ok(())
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> Result<(), Error> {
    let d = std::fs::File::open(dir).map_err(|e| io(dir, "open the directory", e))?;
    match d.sync_all() {
        Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => Ok(()),
        r => r.map_err(|e| io(dir, "fsync the directory", e)),
    }
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> Result<(), Error> {
    // Windows cannot open a directory as a file to flush it; MoveFileEx's rename is
    // flushed with the file system's metadata.
    Ok(())
}

//! Replacing a file so that a crash at any instant leaves either the old or the new one.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::Error;

fn io(path: &Path, op: &'static str, e: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        op,
        kind: e.kind(),
        message: e.to_string(),
    }
}

/// Writes `bytes` to `path` atomically and durably:
///
/// 1. a new temporary file `.{name}.{random}.tmp` is created (`O_EXCL`) in `path`'s
///    directory, so that the final rename stays within one file system;
/// 2. `bytes` are written to it and it is `fsync`ed, so its contents are on disk before
///    any name points at them;
/// 3. it is renamed over `path` (atomic on POSIX file systems; `MoveFileEx` with
///    `MOVEFILE_REPLACE_EXISTING` on Windows);
/// 4. the directory is `fsync`ed (Unix), so the rename itself survives a power loss.
///
/// A process killed anywhere in 1–3 leaves `path` as it was (plus, at worst, the stray
/// temporary file, which nothing reads); an error in 1–3 removes the temporary file and
/// leaves `path` as it was. An error in 4 is reported although `path` already holds the
/// new contents (they may not survive a power loss). A directory `fsync` that the file
/// system does not support (`EINVAL`) is not an error. The new file keeps the permissions
/// of the file it replaces; a new one gets `0o644` less the umask (Unix).
///
/// ```
/// let dir = std::env::temp_dir().join(format!("lamb-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("notes.txt");
/// lamb_std::checkpoint::write_atomic(&path, b"first")?;
/// lamb_std::checkpoint::write_atomic(&path, b"second")?;
/// assert_eq!(std::fs::read(&path).unwrap(), b"second");
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), lamb_std::Error>(())
/// ```
pub fn write_atomic(path: impl AsRef<Path>, bytes: &[u8]) -> Result<(), Error> {
    let path = path.as_ref();
    let name = path.file_name().ok_or_else(|| Error::Io {
        path: path.to_path_buf(),
        op: "write",
        kind: std::io::ErrorKind::InvalidInput,
        message: "the path names no file".into(),
    })?;
    let dir: PathBuf = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(name);
    prefix.push(".");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).map_or(0o644, |m| m.permissions().mode() & 0o7777);
        builder.permissions(std::fs::Permissions::from_mode(mode));
    }
    let mut tmp = builder
        .tempfile_in(&dir)
        .map_err(|e| io(&dir, "create a temporary file in", e))?;
    // From here, dropping `tmp` on an error deletes the temporary file.
    tmp.as_file_mut()
        .write_all(bytes)
        .map_err(|e| io(tmp.path(), "write", e))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| io(tmp.path(), "fsync", e))?;
    tmp.persist(path)
        .map_err(|e| io(path, "rename the temporary file over", e.error))?;
    sync_dir(&dir)
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

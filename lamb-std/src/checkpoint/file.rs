//! Reading a checkpoint file: regular files only, opened without blocking, and never more
//! bytes than the registered model's largest checkpoint or the file's size when opened.

use std::fs::{File, FileType};
use std::io::{ErrorKind, Read};
use std::path::Path;

use super::container::{MAX_HEADER, refused};
use crate::error::Error;
use crate::optimizer::{Lamb, LayerId};

/// What a file is, in words: "a directory", "a FIFO (named pipe)", ...
pub(crate) fn describe(ft: FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if ft.is_char_device() {
            return "a character device";
        }
        if ft.is_block_device() {
            return "a block device";
        }
        if ft.is_socket() {
            return "a socket";
        }
    }
    if ft.is_dir() {
        "a directory"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else if ft.is_file() {
        "a regular file"
    } else {
        "a special file"
    }
}

/// The `io::ErrorKind` of "this path is not a regular file".
pub(crate) fn kind_of(ft: FileType) -> ErrorKind {
    if ft.is_dir() {
        ErrorKind::IsADirectory
    } else {
        ErrorKind::InvalidInput
    }
}

/// The [`Error::Io`] of operation `op` on `path`.
pub(crate) fn io(path: &Path, op: &'static str, e: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        op,
        kind: e.kind(),
        message: e.to_string(),
    }
}

/// Refuses anything but a regular file.
fn regular(path: &Path, ft: FileType) -> Result<(), Error> {
    if ft.is_file() {
        return Ok(());
    }
    Err(Error::Io {
        path: path.to_path_buf(),
        op: "read a checkpoint from",
        kind: kind_of(ft),
        message: format!("it is {}, not a regular file", describe(ft)),
    })
}

/// Opens `path` (following symbolic links) for reading if it is a regular file; returns
/// the file and its size. Never blocks: the type is checked before the open (opening a
/// FIFO with no writer blocks, opening a device can act on it), the open is non-blocking
/// (Unix), and the opened file is checked again (the path may have changed in between).
fn open_regular(path: &Path) -> Result<(File, u64), Error> {
    let md = std::fs::metadata(path).map_err(|e| io(path, "open", e))?;
    regular(path, md.file_type())?;
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // No effect on a regular file; a FIFO or terminal swapped in cannot block or
        // become the controlling terminal.
        options.custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    }
    let file = options.open(path).map_err(|e| io(path, "open", e))?;
    let md = file.metadata().map_err(|e| io(path, "read", e))?;
    regular(path, md.file_type())?;
    Ok((file, md.len()))
}

/// Reads a checkpoint file: a regular file no larger than any checkpoint of `lamb` can
/// be (checked before reading), read up to its size when opened (a file that grows while
/// it is read is refused, not read on).
pub(super) fn read_bounded(lamb: &Lamb, path: &Path) -> Result<Vec<u8>, Error> {
    let elements: u64 = (0..lamb.layer_count())
        .map(|i| lamb.layer_at(LayerId(i)).len as u64)
        .fold(0, u64::saturating_add);
    // At most: m, v, a master copy and the params in f32 (16 bytes per element), a step
    // tensor of 8 bytes per layer, the header limit.
    let max = (8 + MAX_HEADER)
        .saturating_add(elements.saturating_mul(16))
        .saturating_add((lamb.layer_count() as u64).saturating_mul(8));
    let (file, len) = open_regular(path)?;
    if len > max {
        return Err(refused(
            Some(path),
            format!(
                "the file has {len} bytes, more than any checkpoint of this optimizer \
                 ({} layers, {elements} elements) can have ({max})",
                lamb.layer_count()
            ),
        ));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(len + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io(path, "read", e))?;
    if bytes.len() as u64 > len {
        return Err(refused(
            Some(path),
            format!(
                "the file grew while it was read (it had {len} bytes when opened); \
                 is it still being written?"
            ),
        ));
    }
    Ok(bytes)
}

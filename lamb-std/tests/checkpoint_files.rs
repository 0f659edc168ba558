//! Checkpoints and the file system: what `save` replaces (a regular file, or the regular
//! file a symbolic link leads to; never a device, FIFO, socket or directory), what `load`
//! reads (regular files only, without blocking, no more bytes than the file had), and the
//! temporary files of saves that were killed (removed once abandoned). Unix only: the
//! special files are made with `mkfifo` and, as root, `mknod`.
#![cfg(unix)]

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use lamb_std::lamb_core::LambConfig;
use lamb_std::{Error, Lamb};

fn temp_dir(tag: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("checkpoint-files-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn optimizer() -> Lamb {
    let mut opt = Lamb::new(LambConfig::paper()).unwrap();
    opt.add_layer("w", 3).unwrap();
    opt
}

/// An optimizer one step in, so that its checkpoint differs from a fresh one's.
fn stepped() -> Lamb {
    let mut opt = optimizer();
    let _ = opt
        .step(&mut [&mut [0.5, -1.0, 2.0]], &[&[0.1, 0.2, -0.3]])
        .unwrap();
    opt
}

fn c_path(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn mkfifo(p: &Path) {
    // SAFETY: a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c_path(p).as_ptr(), 0o644) }, 0);
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn assert_refused_save(e: &Error, path: &Path, what: &str) {
    assert!(
        matches!(e, Error::Io { op: "replace", .. }),
        "{}: expected a refusal to replace, got {e:?}",
        path.display()
    );
    let want = format!("could not replace '{}': {what}", path.display());
    assert_eq!(e.to_string(), want);
}

/// Runs `f` on another thread and waits at most `secs` for it: a load that blocks fails
/// the test instead of hanging it.
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> (T, Duration) {
    let (tx, rx) = mpsc::channel();
    let start = Instant::now();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    let out = rx
        .recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("still running after {secs} s: it blocks"));
    (out, start.elapsed())
}

// ---------------------------------------------------------------------------------------
// Saving.

#[test]
fn save_refuses_a_fifo_and_leaves_it_a_fifo() {
    let dir = temp_dir("save-fifo");
    let fifo = dir.join("uploader.fifo");
    mkfifo(&fifo);
    let opt = stepped();
    let e = opt.save(&fifo).unwrap_err();
    assert_refused_save(&e, &fifo, "it is a FIFO (named pipe), not a regular file");
    let e = lamb_std::checkpoint::write_atomic(&fifo, b"x").unwrap_err();
    assert_refused_save(&e, &fifo, "it is a FIFO (named pipe), not a regular file");
    assert!(
        std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo()
    );
    assert_eq!(names(&dir), ["uploader.fifo"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `mknod t c 1 3` (a /dev/null) then `save("t")`: refused, and the node stays a device.
/// Needs root with CAP_MKNOD (CI runs as root); elsewhere it says SKIPPED.
#[test]
fn save_refuses_a_character_device_and_leaves_it_one() {
    if !is_root() {
        println!("SKIPPED: mknod of a character device needs root");
        return;
    }
    let dir = temp_dir("save-chardev");
    let dev = dir.join("null");
    // SAFETY: a NUL-terminated path that outlives the call.
    let rc = unsafe {
        libc::mknod(
            c_path(&dev).as_ptr(),
            libc::S_IFCHR | 0o666,
            libc::makedev(1, 3),
        )
    };
    if rc != 0 {
        // Root without CAP_MKNOD (a user namespace, a restricted container).
        let e = std::io::Error::last_os_error();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "mknod: {e}");
        println!("SKIPPED: mknod of a character device is not permitted here: {e}");
        std::fs::remove_dir_all(&dir).unwrap();
        return;
    }
    let e = stepped().save(&dev).unwrap_err();
    assert_refused_save(&e, &dev, "it is a character device, not a regular file");
    let md = std::fs::symlink_metadata(&dev).unwrap();
    assert!(md.file_type().is_char_device());
    assert_eq!(names(&dir), ["null"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn save_through_a_symbolic_link_replaces_the_file_it_leads_to() {
    let dir = temp_dir("save-link");
    let store = dir.join("store");
    let runs = dir.join("runs");
    std::fs::create_dir_all(&store).unwrap();
    std::fs::create_dir_all(&runs).unwrap();
    let real = store.join("ckpt.safetensors");
    let first = optimizer();
    first.save(&real).unwrap();
    // runs/latest -> ../store/ckpt.safetensors (relative), and a link to that link.
    let latest = runs.join("latest");
    std::os::unix::fs::symlink("../store/ckpt.safetensors", &latest).unwrap();
    let chain = dir.join("chain");
    std::os::unix::fs::symlink(&latest, &chain).unwrap();

    let second = stepped();
    second.save(&latest).unwrap();
    // The links are still links, leading where they did, to the new contents.
    assert_eq!(
        std::fs::read_link(&latest).unwrap(),
        Path::new("../store/ckpt.safetensors")
    );
    assert_eq!(
        std::fs::read(&real).unwrap(),
        std::fs::read(&latest).unwrap()
    );
    let mut loaded = optimizer();
    loaded.load(&real).unwrap();
    assert_eq!(loaded.steps(), 1);
    assert_eq!(names(&store), ["ckpt.safetensors"]);
    assert_eq!(names(&runs), ["latest"]);

    // Through two links.
    let mut third = stepped();
    let _ = third
        .step(&mut [&mut [0.5, -1.0, 2.0]], &[&[0.1, 0.2, -0.3]])
        .unwrap();
    third.save(&chain).unwrap();
    assert!(std::fs::symlink_metadata(&chain).unwrap().is_symlink());
    assert!(std::fs::symlink_metadata(&latest).unwrap().is_symlink());
    let mut loaded = optimizer();
    loaded.load(&real).unwrap();
    assert_eq!(loaded.steps(), 2);
    assert_eq!(names(&store), ["ckpt.safetensors"]);
    assert_eq!(names(&dir), ["chain", "runs", "store"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn save_refuses_a_link_to_a_directory_or_to_nothing() {
    let dir = temp_dir("save-badlink");
    let sub = dir.join("sub");
    std::fs::create_dir(&sub).unwrap();
    let to_dir = dir.join("to-dir");
    std::os::unix::fs::symlink("sub", &to_dir).unwrap();
    let e = stepped().save(&to_dir).unwrap_err();
    assert_refused_save(
        &e,
        &to_dir,
        "it is a symbolic link to 'sub', which is a directory, not a regular file",
    );
    assert!(std::fs::symlink_metadata(&to_dir).unwrap().is_symlink());
    assert!(std::fs::metadata(&to_dir).unwrap().is_dir());

    let dangling = dir.join("dangling");
    std::os::unix::fs::symlink("missing/ckpt", &dangling).unwrap();
    let e = stepped().save(&dangling).unwrap_err();
    assert_refused_save(
        &e,
        &dangling,
        "it is a symbolic link to 'missing/ckpt', which does not exist",
    );
    assert!(std::fs::symlink_metadata(&dangling).unwrap().is_symlink());

    let fifo = dir.join("fifo");
    mkfifo(&fifo);
    let to_fifo = dir.join("to-fifo");
    std::os::unix::fs::symlink("fifo", &to_fifo).unwrap();
    let e = stepped().save(&to_fifo).unwrap_err();
    assert_refused_save(
        &e,
        &to_fifo,
        "it is a symbolic link to 'fifo', which is a FIFO (named pipe), not a regular file",
    );
    assert_eq!(
        names(&dir),
        ["dangling", "fifo", "sub", "to-dir", "to-fifo"]
    );
    assert_eq!(names(&sub), Vec::<String>::new());
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The temporary files of killed saves (not locked: their writer is dead) are removed by
/// the next save of the same target; one held locked by a live writer is kept, and so is
/// anything that is not exactly such a file.
#[test]
fn a_save_removes_abandoned_temporaries_and_keeps_everything_else() {
    let dir = temp_dir("abandoned");
    let path = dir.join("ckpt.safetensors");
    let temp = |hex: &str| dir.join(format!(".ckpt.safetensors.{hex}.tmp"));
    // Abandoned: what a save killed between naming its file and the rename leaves.
    for hex in ["0123456789abcdef", "fedcba9876543210", "00000000000000ff"] {
        std::fs::write(temp(hex), b"partial").unwrap();
    }
    // A live writer: created, locked and held open by "another save".
    let live = temp("1111111111111111");
    let writer = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&live)
        .unwrap();
    writer.lock().unwrap();
    // Look-alikes: another target's, a link, a FIFO, other names.
    let keep = [
        ".other.safetensors.0123456789abcdef.tmp",
        ".ckpt.safetensors.abc123.tmp",
        "ckpt.safetensors.0123456789abcdef.tmp",
    ];
    for k in keep {
        std::fs::write(dir.join(k), b"keep").unwrap();
    }
    std::os::unix::fs::symlink("ckpt.safetensors", temp("2222222222222222")).unwrap();
    mkfifo(&temp("3333333333333333"));

    let (saved, _) = within(20, {
        let path = path.clone();
        move || stepped().save(&path)
    });
    saved.unwrap();
    let mut want: Vec<String> = keep.iter().map(|s| s.to_string()).collect();
    want.extend([
        ".ckpt.safetensors.1111111111111111.tmp".into(),
        ".ckpt.safetensors.2222222222222222.tmp".into(),
        ".ckpt.safetensors.3333333333333333.tmp".into(),
        "ckpt.safetensors".into(),
    ]);
    want.sort();
    assert_eq!(names(&dir), want);
    // The writer finishes (here: dies): its file is abandoned now, and goes at the next save.
    drop(writer);
    stepped().save(&path).unwrap();
    assert!(!live.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------
// Loading.

#[test]
fn load_of_a_fifo_with_no_writer_is_refused_without_blocking() {
    let dir = temp_dir("load-fifo");
    let fifo = dir.join("ckpt.fifo");
    mkfifo(&fifo);
    let (errors, took) = within(20, {
        let fifo = fifo.clone();
        move || {
            let mut opt = optimizer();
            [
                opt.load(&fifo).unwrap_err(),
                opt.load_with_params(&fifo, &mut [&mut [0.0; 3]])
                    .unwrap_err(),
                opt.load_torch_state(&fifo).unwrap_err(),
            ]
        }
    });
    for e in errors {
        assert!(
            matches!(
                e,
                Error::Io {
                    op: "read a checkpoint from",
                    kind: std::io::ErrorKind::InvalidInput,
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            format!(
                "could not read a checkpoint from '{}': it is a FIFO (named pipe), not a \
                 regular file",
                fifo.display()
            )
        );
    }
    println!("3 loads of a FIFO with no writer refused in {took:.2?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `/dev/zero` reads as an endless file of size 0: it was read up to the largest checkpoint
/// of the model (about 100 MB + 16 bytes per parameter) before being refused. Now it is
/// refused before it is opened.
#[test]
fn load_of_dev_zero_is_refused_without_reading() {
    let (e, took) = within(20, || optimizer().load("/dev/zero").unwrap_err());
    assert_eq!(
        e.to_string(),
        "could not read a checkpoint from '/dev/zero': it is a character device, not a \
         regular file"
    );
    println!("/dev/zero refused in {took:.2?}");
}

#[test]
fn load_of_a_directory_is_refused() {
    let dir = temp_dir("load-dir");
    let e = optimizer().load(&dir).unwrap_err();
    assert!(
        matches!(
            e,
            Error::Io {
                kind: std::io::ErrorKind::IsADirectory,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(
        e.to_string()
            .ends_with("': it is a directory, not a regular file"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A regular file is read up to the size it had when opened and no further: Linux's
/// `/proc` files are regular, report a size of 0, and yet have contents, like a file that
/// grows while it is read.
#[cfg(target_os = "linux")]
#[test]
fn load_reads_no_more_than_the_file_had_when_opened() {
    let e = optimizer().load("/proc/self/status").unwrap_err();
    assert_eq!(
        e.to_string(),
        "checkpoint '/proc/self/status': the file grew while it was read (it had 0 bytes \
         when opened); is it still being written?"
    );
}

/// A checkpoint reached through a symbolic link loads, and a load does not open the file
/// for writing (a read-only checkpoint loads).
#[test]
fn load_follows_links_to_regular_files() {
    let dir = temp_dir("load-link");
    let real = dir.join("ckpt");
    stepped().save(&real).unwrap();
    std::fs::set_permissions(&real, std::os::unix::fs::PermissionsExt::from_mode(0o444)).unwrap();
    let link = dir.join("latest");
    std::os::unix::fs::symlink("ckpt", &link).unwrap();
    let mut opt = optimizer();
    opt.load(&link).unwrap();
    assert_eq!(opt.steps(), 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

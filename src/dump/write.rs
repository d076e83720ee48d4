//! Writing a dump: the directory and its manifest ([`DumpWriter`]), whole files written
//! under a temporary name and renamed into place, and files streamed row by row
//! ([`FileStream`]) as they come off a device.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::{tensor::TensorView, Dtype};

use super::{validate_prompt_id, Manifest, RunError, Status, TapDType, TapTensor, DATA, MANIFEST};
use crate::error::{Error, Result};
use crate::output::write_atomic;

/// Whether `path` is a resbisect dump's manifest (a file of at most the size a manifest
/// may have, parsed as format v1), not any file of that name: a web app's or a model
/// checkpoint's `manifest.json` makes no dump of its directory.
fn is_dump_manifest(path: &Path) -> bool {
    let small_file = fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() <= super::MAX_MANIFEST_BYTES);
    small_file && fs::read(path).is_ok_and(|text| super::parse_manifest(&text).is_ok_and(|m| m.format == super::FORMAT))
}

/// Refuse to replace the dump at `root` when its `data/` holds anything dump format v1
/// does not put there (`<prompt>/<stem>.safetensors`, and the temporary files of a killed
/// writer): replacing the dump removes `data/`, and with it what a user kept there.
fn refuse_foreign_data(root: &Path) -> Result<()> {
    let data = root.join(DATA);
    let foreign = |path: &Path| {
        Err(Error::input(format!(
            "{}: not part of a dump, and replacing the dump would delete it; move it, or write the dump elsewhere",
            path.display()
        )))
    };
    match fs::symlink_metadata(&data) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(&data, e)),
        Ok(m) if !m.is_dir() => return foreign(&data),
        Ok(_) => {}
    }
    for prompt in fs::read_dir(&data).map_err(|e| Error::io(&data, e))? {
        let prompt = prompt.map_err(|e| Error::io(&data, e))?;
        if !prompt.file_type().is_ok_and(|t| t.is_dir()) {
            return foreign(&prompt.path());
        }
        for file in fs::read_dir(prompt.path()).map_err(|e| Error::io(&prompt.path(), e))? {
            let file = file.map_err(|e| Error::io(&prompt.path(), e))?;
            let name = file.file_name();
            let ours = name
                .to_str()
                .is_some_and(|n| n.ends_with(".safetensors") || crate::output::is_temporary(n));
            if !ours || !file.file_type().is_ok_and(|t| t.is_file()) {
                return foreign(&file.path());
            }
        }
    }
    Ok(())
}

/// Writes one dump directory. The manifest is written at creation with status
/// `running`, and rewritten (atomically) when the status changes. The writer holds an
/// exclusive lock on the directory for its lifetime, so two runs never write one dump.
pub struct DumpWriter {
    root: PathBuf,
    pub(super) manifest: Manifest,
    _lock: fs::File,
}

impl DumpWriter {
    /// Create the dump. An existing dump at `root` is replaced only with `overwrite`, and
    /// only when its `data/` holds nothing a dump does not write; any other non-empty
    /// directory is refused, so nothing unrelated is deleted.
    pub fn create(root: &Path, manifest: Manifest, overwrite: bool) -> Result<Self> {
        for p in &manifest.prompts {
            validate_prompt_id(&p.id)?;
        }
        fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
        let lock = fs::File::open(root).map_err(|e| Error::io(root, e))?;
        lock.try_lock().map_err(|e| match e {
            fs::TryLockError::WouldBlock => {
                Error::input(format!("{}: another run is writing a dump there", root.display()))
            }
            fs::TryLockError::Error(e) => Error::io(root, e),
        })?;
        if Self::check_output(root, overwrite)? {
            fs::remove_file(root.join(MANIFEST)).map_err(|e| Error::io(root, e))?;
            let data = root.join(DATA);
            if data.exists() {
                fs::remove_dir_all(&data).map_err(|e| Error::io(&data, e))?;
            }
        }
        for p in &manifest.prompts {
            let dir = root.join(DATA).join(&p.id);
            fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        }
        let w = Self {
            root: root.to_path_buf(),
            manifest,
            _lock: lock,
        };
        w.write_manifest()?;
        Ok(w)
    }

    /// Refuse an output `root` that [`DumpWriter::create`] would refuse, before any work:
    /// an existing dump without `overwrite` or with files of the user's in its `data/`,
    /// any other non-empty directory. Returns
    /// whether `root` holds a dump that `create` will replace.
    pub fn check_output(root: &Path, overwrite: bool) -> Result<bool> {
        if !root.exists() {
            return Ok(false);
        }
        let is_dump = is_dump_manifest(&root.join(MANIFEST));
        let empty = fs::read_dir(root).map_err(|e| Error::io(root, e))?.next().is_none();
        if !(empty || is_dump && overwrite) {
            let hint = if is_dump {
                " (it is a dump: pass --overwrite to replace it)"
            } else if root.join(MANIFEST).exists() {
                " (its manifest.json is no resbisect dump's, so --overwrite does not replace it)"
            } else {
                ""
            };
            return Err(Error::input(format!(
                "{}: output directory exists and is not empty{hint}",
                root.display()
            )));
        }
        if is_dump {
            refuse_foreign_data(root)?;
        }
        Ok(is_dump)
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    fn write_manifest(&self) -> Result<()> {
        let path = self.root.join(MANIFEST);
        let json = serde_json::to_vec_pretty(&self.manifest).map_err(|e| Error::input(format!("manifest: {e}")))?;
        // No fsync: the crash a dump must survive is the engine's, and the page cache
        // outlives a process. Syncing the manifest alone would promise nothing after a
        // power loss (the tap files are not synced) and costs a journal commit per status.
        write_atomic(&path, |tmp| fs::write(tmp, &json).map_err(|e| Error::io(tmp, e)))
    }

    /// Write `data/<prompt>/<stem>.safetensors` with its `positions` and tap tensors.
    pub fn write_file(&self, prompt_id: &str, stem: &str, positions: &[usize], taps: &[TapTensor]) -> Result<()> {
        validate_prompt_id(prompt_id)?;
        if !self.manifest.prompts.iter().any(|p| p.id == prompt_id) {
            return Err(Error::input(format!("prompt {prompt_id} is not in the manifest")));
        }
        let pos_bytes: Vec<u8> = positions.iter().flat_map(|&p| (p as i64).to_le_bytes()).collect();
        let mut views: Vec<(String, TensorView)> = Vec::with_capacity(taps.len() + 1);
        let view =
            |dtype, shape, data| TensorView::new(dtype, shape, data).map_err(|e| Error::input(format!("{stem}: {e}")));
        views.push(("positions".into(), view(Dtype::I64, vec![positions.len()], &pos_bytes)?));
        for t in taps {
            if t.rows != positions.len() {
                return Err(Error::input(format!(
                    "tap {} has {} rows for {} positions",
                    t.id,
                    t.rows,
                    positions.len()
                )));
            }
            views.push((
                t.id.clone(),
                view(t.dtype.safetensors(), vec![t.rows, t.width], &t.bytes)?,
            ));
        }
        let path = self.root.join(DATA).join(prompt_id).join(format!("{stem}.safetensors"));
        write_atomic(&path, |tmp| {
            safetensors::serialize_to_file(views, None, tmp)
                .map_err(|e| Error::input(format!("{}: {e}", tmp.display())))?;
            crate::output::set_default_mode(tmp)
        })
    }

    /// Start `data/<prompt>/<stem>.safetensors` as a stream of rows: `taps` are (id, dtype,
    /// width), each with a row per position.
    pub fn stream_file(
        &self,
        prompt_id: &str,
        stem: &str,
        positions: &[usize],
        taps: &[(String, TapDType, usize)],
    ) -> Result<FileStream> {
        use safetensors::tensor::{Metadata, TensorInfo};
        validate_prompt_id(prompt_id)?;
        if !self.manifest.prompts.iter().any(|p| p.id == prompt_id) {
            return Err(Error::input(format!("prompt {prompt_id} is not in the manifest")));
        }
        let n = positions.len();
        let mut infos = vec![(
            "positions".to_string(),
            TensorInfo {
                dtype: Dtype::I64,
                shape: vec![n],
                data_offsets: (0, 8 * n),
            },
        )];
        let mut end = 8 * n;
        for (id, dtype, width) in taps {
            let len = n * width * dtype.size();
            infos.push((
                id.clone(),
                TensorInfo {
                    dtype: dtype.safetensors(),
                    shape: vec![n, *width],
                    data_offsets: (end, end + len),
                },
            ));
            end += len;
        }
        let metadata = Metadata::new(None, infos).map_err(|e| Error::input(format!("{stem}: {e}")))?;
        let mut header = serde_json::to_vec(&metadata).map_err(|e| Error::input(format!("{stem}: {e}")))?;
        // Data starts 8-byte aligned, as safetensors writers pad it.
        header.resize(header.len().next_multiple_of(8), b' ');
        let data_start = (8 + header.len()) as u64;
        let path = self.root.join(DATA).join(prompt_id).join(format!("{stem}.safetensors"));
        let tmp = path.with_file_name(format!(".{stem}.safetensors.tmp-{}", std::process::id()));
        let mut file = fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let pos_bytes: Vec<u8> = positions.iter().flat_map(|&p| (p as i64).to_le_bytes()).collect();
        let head = [&(header.len() as u64).to_le_bytes()[..], &header, &pos_bytes].concat();
        file.write_all(&head)
            .and_then(|_| file.set_len(data_start + end as u64))
            .map_err(|e| Error::io(&tmp, e))?;
        let mut offset = data_start + 8 * n as u64;
        let taps = taps
            .iter()
            .map(|(id, dtype, width)| {
                let at = offset;
                offset += (n * width * dtype.size()) as u64;
                (id.clone(), at, width * dtype.size())
            })
            .collect();
        let stream = FileStream {
            path,
            tmp,
            file,
            prompt_id: prompt_id.to_string(),
            order: 0,
            taps,
            rows: n,
            unwritten: ((end - 8 * n) as u64).into(),
        };
        if end == 8 * n {
            // No tap rows to wait for.
            fs::rename(&stream.tmp, &stream.path).map_err(|e| Error::io(&stream.path, e))?;
        }
        Ok(stream)
    }

    pub fn finish(&mut self, status: Status, error: Option<RunError>) -> Result<()> {
        self.manifest.status = status;
        self.manifest.error = error;
        self.write_manifest()
    }
}

/// A dump file written in pieces as rows come off a device: the header (every tap, every
/// row) and the positions go first, rows land at their offsets, and the file is renamed
/// into place by the write that completes it. Dropped incomplete, it leaves nothing.
pub struct FileStream {
    path: PathBuf,
    tmp: PathBuf,
    file: fs::File,
    pub(super) prompt_id: String,
    /// Creation order among the dump's files, for naming the last one written.
    pub(super) order: usize,
    /// Per tap: id, byte offset of its first row, bytes per row.
    taps: Vec<(String, u64, usize)>,
    rows: usize,
    /// Tap bytes not yet written; the write that takes it to zero renames the file.
    unwritten: std::sync::atomic::AtomicU64,
}

impl FileStream {
    /// The stream's taps, in file order.
    pub fn tap_ids(&self) -> impl Iterator<Item = &str> {
        self.taps.iter().map(|(id, _, _)| id.as_str())
    }

    /// Write rows `first_row..` of tap `tap` (an index into the stream's taps); true when
    /// this completed the file (it is then in place).
    pub fn write_rows(&self, tap: usize, first_row: usize, bytes: &[u8]) -> Result<bool> {
        use std::os::unix::fs::FileExt;
        use std::sync::atomic::Ordering;
        let (id, offset, row_bytes) = &self.taps[tap];
        if !bytes.len().is_multiple_of(*row_bytes) || first_row + bytes.len() / row_bytes > self.rows {
            return Err(Error::engine(format!(
                "{id}: {} bytes at row {first_row} do not fit {} rows of {row_bytes} bytes",
                bytes.len(),
                self.rows
            )));
        }
        self.file
            .write_all_at(bytes, offset + (first_row * row_bytes) as u64)
            .map_err(|e| Error::io(&self.tmp, e))?;
        if self.unwritten.fetch_sub(bytes.len() as u64, Ordering::SeqCst) != bytes.len() as u64 {
            return Ok(false);
        }
        fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        Ok(true)
    }
}

impl Drop for FileStream {
    fn drop(&mut self) {
        if self.unwritten.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            // Never renamed: only the temporary name exists, and nothing should remain.
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

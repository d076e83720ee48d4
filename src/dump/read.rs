//! Reading a dump back: the manifest checked on open ([`Dump`]), files memory-mapped
//! and validated against the model ([`MappedFile`]), rows read in their stored dtype
//! ([`TapView`]) or decoded to f64 ([`DumpFile`]).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::{Dtype, SafeTensors};

use super::{
    parse_manifest, validate_prompt_id, Manifest, PromptRecord, TapDType, DATA, FORMAT, MANIFEST, MAX_MANIFEST_BYTES,
    VERSION,
};
use crate::error::{Error, Result};
use crate::model::Config;
use crate::taps::{FileStem, Tap};

/// A tap read back from a dump, converted to f64 for comparison.
#[derive(Debug, Clone)]
pub struct TapRows {
    pub dtype: TapDType,
    pub width: usize,
    /// Row-major `[positions.len(), width]`.
    pub values: Vec<f64>,
}

/// One dump file read back and validated.
#[derive(Debug, Clone)]
pub struct DumpFile {
    pub positions: Vec<usize>,
    pub taps: BTreeMap<String, TapRows>,
}

/// A dump opened for reading: a validated manifest, files read on demand.
pub struct Dump {
    pub root: PathBuf,
    pub manifest: Manifest,
    /// Prompt id to its index in the manifest: lookups stay O(1) however many prompts.
    prompt_index: HashMap<String, usize>,
    /// Prompts read under another id than their directory's (id, directory): diff pairs
    /// prompts whose ids differ between two dumps this way.
    renamed: Vec<(String, String)>,
}

impl Dump {
    pub fn open(root: &Path) -> Result<Self> {
        let path = root.join(MANIFEST);
        let meta = fs::symlink_metadata(&path).map_err(|_| {
            let why = match fs::metadata(root) {
                Ok(m) if m.is_dir() => format!("no {MANIFEST} in it"),
                Ok(_) => "a file, not a dump directory".to_string(),
                Err(_) => "no such directory".to_string(),
            };
            Error::input(format!("{}: not a dump ({why})", root.display()))
        })?;
        // A FIFO would block the read forever; a link may lead out of the dump, as under data/.
        if !meta.is_file() {
            return Err(Error::input(format!(
                "{}: not a regular file (links out of the dump are refused)",
                path.display()
            )));
        }
        if meta.len() > MAX_MANIFEST_BYTES {
            return Err(Error::input(format!(
                "{}: manifest is {} bytes, over the {} limit",
                path.display(),
                meta.len(),
                MAX_MANIFEST_BYTES
            )));
        }
        let text = fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let manifest =
            parse_manifest(&text).map_err(|e| Error::input(format!("{}: bad manifest: {e}", path.display())))?;
        if manifest.format != FORMAT {
            return Err(Error::input(format!(
                "{}: format is {:?}, expected {FORMAT:?}",
                path.display(),
                manifest.format
            )));
        }
        if manifest.version != VERSION {
            return Err(Error::input(format!(
                "{}: dump format version {} is not supported (this build reads {VERSION})",
                path.display(),
                manifest.version
            )));
        }
        let mut prompt_index = HashMap::with_capacity(manifest.prompts.len());
        for (i, p) in manifest.prompts.iter().enumerate() {
            validate_prompt_id(&p.id).map_err(|e| Error::input(format!("{}: {e}", path.display())))?;
            if prompt_index.insert(p.id.clone(), i).is_some() {
                return Err(Error::input(format!(
                    "{}: prompt id {} appears twice",
                    path.display(),
                    p.id
                )));
            }
            if let Some(&t) = p.tokens.iter().find(|&&t| t as usize >= manifest.model.config.n_vocab) {
                return Err(Error::input(format!(
                    "{}: prompt {} has token {t} outside the vocabulary",
                    path.display(),
                    p.id
                )));
            }
        }
        let dump = Self {
            root: root.to_path_buf(),
            manifest,
            prompt_index,
            renamed: Vec::new(),
        };
        dump.check_data_files()?;
        Ok(dump)
    }

    /// Refuse what the format does not allow under data/: a directory that is a link (it
    /// could lead out of the dump), and a tap file whose name is no file of this model (a
    /// `blk.35` in a 30-layer dump: an engine that thinks the model has more layers).
    fn check_data_files(&self) -> Result<()> {
        let not_a_link = |p: &Path| match fs::symlink_metadata(p) {
            Ok(m) if m.file_type().is_symlink() => Err(Error::input(format!(
                "{}: a link (links out of the dump are refused)",
                p.display()
            ))),
            _ => Ok(()),
        };
        let data = self.root.join(DATA);
        not_a_link(&data)?;
        let n_layer = self.manifest.model.config.n_layer;
        for p in &self.manifest.prompts {
            let dir = data.join(&p.id);
            not_a_link(&dir)?;
            let Ok(entries) = fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let Some(stem) = name.strip_suffix(".safetensors").filter(|_| !name.starts_with('.')) else {
                    continue;
                };
                if FileStem::parse_in(stem, n_layer).is_none() {
                    return Err(Error::input(format!(
                        "{}: not a file of this dump (embed, output or blk.L for a layer L below {n_layer})",
                        dir.join(&name).display()
                    )));
                }
            }
        }
        Ok(())
    }

    /// This dump with its prompt `from` read as `to` (its files stay where they are).
    pub fn with_prompt_renamed(&self, from: &str, to: &str) -> Result<Self> {
        self.prompt(from)?;
        let mut manifest = self.manifest.clone();
        manifest.prompts.retain(|p| p.id == from || p.id != to);
        for p in &mut manifest.prompts {
            if p.id == from {
                p.id = to.to_string();
            }
        }
        let mut renamed = self.renamed.clone();
        renamed.push((to.to_string(), self.directory_of(from).to_string()));
        let prompt_index = manifest
            .prompts
            .iter()
            .enumerate()
            .map(|(i, p)| (p.id.clone(), i))
            .collect();
        Ok(Self {
            root: self.root.clone(),
            manifest,
            prompt_index,
            renamed,
        })
    }

    /// The directory under data/ that holds prompt `id`'s files.
    fn directory_of<'a>(&'a self, id: &'a str) -> &'a str {
        self.renamed
            .iter()
            .rev()
            .find(|(as_id, _)| as_id == id)
            .map_or(id, |(_, dir)| dir.as_str())
    }

    pub fn prompt(&self, id: &str) -> Result<&PromptRecord> {
        self.prompt_index
            .get(id)
            .map(|&i| &self.manifest.prompts[i])
            .ok_or_else(|| Error::input(format!("{}: no prompt {id:?} in the dump", self.root.display())))
    }

    pub fn has_prompt(&self, id: &str) -> bool {
        self.prompt_index.contains_key(id)
    }

    /// Names of the files present for a prompt (stems, sorted), skipping temporaries
    /// left by a crash.
    pub fn files(&self, prompt_id: &str) -> Result<Vec<String>> {
        self.prompt(prompt_id)?;
        let dir = self.root.join(DATA).join(self.directory_of(prompt_id));
        let mut out = Vec::new();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(Error::io(&dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| Error::io(&dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(".safetensors") {
                if !name.starts_with('.') {
                    out.push(stem.to_string());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Whether no prompt of the dump holds a single tap file: an engine that finished
    /// without capturing anything it was asked for.
    pub fn wrote_no_tap(&self) -> bool {
        self.manifest
            .prompts
            .iter()
            .all(|p| self.files(&p.id).is_ok_and(|f| f.is_empty()))
    }

    /// The last tap, in topological order, of any whole file of the dump's first prompt:
    /// how far an engine that failed or was killed got.
    pub fn last_tap_on_disk(&self) -> Option<String> {
        let prompt = self.manifest.prompts.first()?;
        let mut best: Option<Tap> = None;
        for stem in self.files(&prompt.id).ok()? {
            if let Ok(Some(f)) = self.map_file(&prompt.id, &stem) {
                best = best.max(f.taps.keys().filter_map(|id| Tap::parse(id)).max());
            }
        }
        best.map(|t| t.id())
    }

    /// Map and validate one file; `None` when it was never written.
    pub fn map_file(&self, prompt_id: &str, stem: &str) -> Result<Option<MappedFile>> {
        let prompt = self.prompt(prompt_id)?;
        let Some(file_stem) = FileStem::parse_in(stem, self.manifest.model.config.n_layer) else {
            return Err(Error::input(format!(
                "{}: {stem:?} is not a dump file name",
                self.root.display()
            )));
        };
        let path = self
            .root
            .join(DATA)
            .join(self.directory_of(prompt_id))
            .join(format!("{stem}.safetensors"));
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, e)),
        };
        if !meta.is_file() {
            return Err(Error::input(format!(
                "{}: not a regular file (links out of the dump are refused)",
                path.display()
            )));
        }
        let file = fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: read-only map of a file the engine finished writing (renamed into place);
        // every access below is bounds-checked by the safetensors header validation.
        // Populated up front: one batched fault instead of one per page while comparing.
        let mmap = unsafe { memmap2::MmapOptions::new().populate().map(&file) }.map_err(|e| Error::io(&path, e))?;
        MappedFile::parse(&path, mmap, file_stem, prompt.tokens.len(), &self.manifest.model.config).map(Some)
    }

    /// Read one file decoded to f64; `None` when it was never written.
    pub fn read_file(&self, prompt_id: &str, stem: &str) -> Result<Option<DumpFile>> {
        let Some(mapped) = self.map_file(prompt_id, stem)? else {
            return Ok(None);
        };
        let taps = mapped
            .taps
            .iter()
            .map(|(id, slice)| {
                let view = mapped.view(slice);
                let values = (0..view.rows * view.width).map(|i| view.get(i)).collect();
                (
                    id.clone(),
                    TapRows {
                        dtype: slice.dtype,
                        width: slice.width,
                        values,
                    },
                )
            })
            .collect();
        Ok(Some(DumpFile {
            positions: mapped.positions.clone(),
            taps,
        }))
    }
}

/// Where a tap's rows sit in a mapped file.
#[derive(Debug, Clone, Copy)]
pub struct TapSlice {
    pub dtype: TapDType,
    pub width: usize,
    offset: usize,
    len: usize,
}

/// A validated, memory-mapped dump file: comparing reads rows straight from the page
/// cache without decoding whole tensors.
pub struct MappedFile {
    mmap: memmap2::Mmap,
    pub positions: Vec<usize>,
    pub taps: BTreeMap<String, TapSlice>,
}

/// Rows of one tap, read element by element in their stored dtype.
#[derive(Clone, Copy)]
pub struct TapView<'a> {
    pub dtype: TapDType,
    pub rows: usize,
    pub width: usize,
    pub bytes: &'a [u8],
}

impl TapView<'_> {
    #[inline]
    pub fn get(&self, i: usize) -> f64 {
        let b = self.bytes;
        match self.dtype {
            TapDType::F32 => f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]) as f64,
            TapDType::F64 => f64::from_le_bytes(b[8 * i..8 * i + 8].try_into().expect("8 bytes")),
            TapDType::F16 => f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f64(),
            TapDType::BF16 => bf16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f64(),
        }
    }

    /// The bytes of row `r`.
    pub fn row(&self, r: usize) -> TapView<'_> {
        let n = self.width * self.dtype.size();
        TapView {
            dtype: self.dtype,
            rows: 1,
            width: self.width,
            bytes: &self.bytes[r * n..(r + 1) * n],
        }
    }

    /// Append every value as f32 (f64 rounds).
    pub fn append_f32(&self, out: &mut Vec<f32>) {
        let b = self.bytes;
        match self.dtype {
            TapDType::F32 => out.extend(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))),
            TapDType::F64 => out.extend(
                b.chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32),
            ),
            TapDType::F16 => out.extend(b.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())),
            TapDType::BF16 => out.extend(b.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())),
        }
    }
}

impl MappedFile {
    fn parse(path: &Path, mmap: memmap2::Mmap, stem: FileStem, seq_len: usize, config: &Config) -> Result<Self> {
        let bad = |msg: String| Error::input(format!("{}: {msg}", path.display()));
        let base = mmap.as_ptr() as usize;
        let st = SafeTensors::deserialize(&mmap).map_err(|e| bad(format!("bad safetensors file: {e}")))?;
        let pos_view = st
            .tensor("positions")
            .map_err(|_| bad("missing the positions tensor".into()))?;
        if pos_view.dtype() != Dtype::I64 || pos_view.shape().len() != 1 {
            return Err(bad(format!(
                "positions must be I64 [n], found {:?} {:?}",
                pos_view.dtype(),
                pos_view.shape()
            )));
        }
        let mut positions = Vec::with_capacity(pos_view.shape()[0]);
        for chunk in pos_view.data().chunks_exact(8) {
            let p = i64::from_le_bytes(chunk.try_into().expect("chunks_exact gives 8 bytes"));
            if p < 0 || p as u64 >= seq_len as u64 {
                return Err(bad(format!("position {p} is outside the prompt's {seq_len} tokens")));
            }
            if positions.last().is_some_and(|&last| last >= p as usize) {
                return Err(bad("positions are not strictly increasing".into()));
            }
            positions.push(p as usize);
        }
        let mut taps = BTreeMap::new();
        for (name, view) in st.iter() {
            if name == "positions" {
                continue;
            }
            let tap = Tap::parse(name).ok_or_else(|| bad(format!("tensor {name:?} is not a canonical tap id")))?;
            if tap.file_stem() != stem {
                return Err(bad(format!("tap {name} belongs in {}.safetensors", tap.file_stem())));
            }
            let dtype = TapDType::from_safetensors(view.dtype()).ok_or_else(|| {
                bad(format!(
                    "tap {name} has dtype {:?}; F32, F16, BF16 or F64 expected",
                    view.dtype()
                ))
            })?;
            let width = tap.width(config);
            if view.shape() != [positions.len(), width] {
                return Err(bad(format!(
                    "tap {name} has shape {:?}, expected [{}, {width}]",
                    view.shape(),
                    positions.len()
                )));
            }
            let data = view.data();
            taps.insert(
                name.to_string(),
                TapSlice {
                    dtype,
                    width,
                    offset: data.as_ptr() as usize - base,
                    len: data.len(),
                },
            );
        }
        drop(st);
        Ok(Self { mmap, positions, taps })
    }

    pub fn view(&self, slice: &TapSlice) -> TapView<'_> {
        TapView {
            dtype: slice.dtype,
            rows: self.positions.len(),
            width: slice.width,
            bytes: &self.mmap[slice.offset..slice.offset + slice.len],
        }
    }

    pub fn tap(&self, id: &str) -> Option<TapView<'_>> {
        self.taps.get(id).map(|s| self.view(s))
    }
}

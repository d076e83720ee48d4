//! [`Backend`] for [`GpuBackend`]: each op checks its bounds against the buffers, then
//! launches its kernel of ops.hip with the arguments [`kernels`] declares, through the
//! driver. The fused ops run as one launch on up to [`GEMV_ROWS`] rows (decode).

use candle_core::quantized::GgmlDType;
use resbisect_taps::Fault;

use super::kernels::{self, Ptr, StorageElem};
use super::plan::{attention_plan, AttnPlan, Grid, GEMV_ROWS, NORM_THREADS};
use super::{Driver, GpuBackend, StepField};
use crate::dump::RowBytes;
use crate::error::{Error, Result};
use crate::runtime::backend::{
    self, AddNorm, AttnShape, Backend, Input, Projections, RopeFreqs, Row, Src, Step, StorageDType,
};

/// An address no allocation holds: a copy aimed here faults on the device.
const UNMAPPED: Ptr = Ptr(0x10);

impl<D: Driver> Backend for GpuBackend<D> {
    type Buf = D::Buf;
    type Table = D::Bytes;
    type Graph = D::Graph;
    type Quant = super::quant::GpuQuant<D>;

    fn name(&self) -> &'static str {
        D::NAME
    }

    fn device(&self) -> String {
        self.driver.device()
    }

    fn free_memory(&self) -> Option<u64> {
        self.driver.free_memory()
    }

    fn dtype(&self) -> StorageDType {
        D::Elem::DTYPE
    }

    fn alloc(&self, len: usize) -> Result<Self::Buf> {
        self.driver.alloc(len)
    }

    fn upload(&self, data: &[f32]) -> Result<Self::Buf> {
        let host: Vec<D::Elem> = data.iter().map(|&v| D::Elem::from_f32(v)).collect();
        if host.is_empty() {
            return self.alloc(0);
        }
        self.driver.upload(&host)
    }

    fn upload_table(&self, data: &[f32]) -> Result<Self::Table> {
        // An empty upload still gets an allocation (a table is never read past its end).
        let bytes: &[u8] = if data.is_empty() {
            &[0; 4]
        } else {
            bytemuck::cast_slice(data)
        };
        self.driver.upload_bytes(bytes)
    }

    fn upload_weight(&self, name: &str, dtype: GgmlDType, dims: &[usize], data: &[u8]) -> Result<Self::Buf> {
        let n: usize = dims.iter().product();
        let decoder = kernels::decoder(dtype).ok_or_else(|| {
            Error::input(format!(
                "{}: {name}: no device decoder for {dtype:?} (supported: f32 f16 bf16 q8_0 q4_0 q4_1 q4_k q5_k q6_k)",
                D::NAME
            ))
        })?;
        if !n.is_multiple_of(decoder.block_values) || data.len() != n / decoder.block_values * decoder.block_bytes {
            return Err(Error::input(format!(
                "{}: {name}: {} bytes are not {n} values of {dtype:?}",
                D::NAME,
                data.len()
            )));
        }
        let out = self.alloc(n)?;
        let raw = self.driver.upload_bytes(data)?;
        let blocks = n / decoder.block_values;
        let call = (decoder.kernel)(Ptr(self.driver.bytes_addr(&raw)), self.ptr(&out), blocks as i64);
        self.driver.launch(call, Grid::linear(blocks, 256))?;
        Ok(out)
    }

    fn upload_quant(&self, name: &str, dtype: GgmlDType, dims: &[usize], data: &[u8]) -> Result<Option<Self::Quant>> {
        self.upload_blocks(name, dtype, dims, data)
    }

    fn matmul_quant(
        &self,
        x: &Self::Buf,
        w: &Self::Quant,
        rows: usize,
        k: usize,
        n: usize,
        out: &mut Self::Buf,
    ) -> Result<()> {
        self.matmul_blocks(x, w, rows, k, n, out)
    }

    fn download(&self, buf: &Self::Buf, offset: usize, len: usize) -> Result<Vec<f32>> {
        let mut bytes = Vec::new();
        self.download_raw(buf, offset, len, &mut bytes)?;
        let size = std::mem::size_of::<D::Elem>();
        Ok(bytes.chunks_exact(size).map(|b| D::Elem::from_le(b).to_f32()).collect())
    }

    fn download_raw(&self, buf: &Self::Buf, offset: usize, len: usize, out: &mut Vec<u8>) -> Result<()> {
        self.check(self.len(buf), offset + len, "download")?;
        if len == 0 {
            return Ok(());
        }
        self.driver.download(buf, offset, len, out)
    }

    fn download_rows(&self, buf: &Self::Buf, runs: &[(usize, usize)], spare: Vec<u8>) -> Result<RowBytes> {
        for &(offset, len) in runs {
            self.check(self.len(buf), offset + len, "download")?;
        }
        if runs.iter().all(|r| r.1 == 0) {
            return Ok(RowBytes::Ready(spare));
        }
        self.driver.download_rows(buf, runs, spare)
    }

    fn reserve_captures(&self, len: usize, count: usize) -> Result<()> {
        self.driver.reserve_captures(len, count)
    }

    fn embed(&self, table: &Self::Buf, width: usize, ids: Src<u32>, out: &mut Self::Buf) -> Result<()> {
        let step = [self.step.get().token];
        let host = match ids {
            Src::Host(ids) => ids,
            Src::Step => &step,
        };
        self.check(self.len(out), host.len() * width, "embed")?;
        let vocab = self.len(table) / width.max(1);
        if let Some(&bad) = host.iter().find(|&&i| i as usize >= vocab) {
            return Err(Error::engine(format!(
                "{}: embed: token {bad} is outside the table of {vocab} rows",
                D::NAME
            )));
        }
        let uploaded;
        let dev_ids = match ids {
            Src::Host(ids) => {
                uploaded = self.driver.upload_bytes(bytemuck::cast_slice(ids))?;
                Ptr(self.driver.bytes_addr(&uploaded))
            }
            Src::Step => self.step_field(StepField::Token),
        };
        let call = kernels::rb_embed(self.ptr(table), dev_ids, self.ptr(out), width as i32, host.len() as i32);
        self.driver.launch(call, Grid::per_row(host.len(), 256))
    }

    fn rms_norm(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        rows: usize,
        width: usize,
        eps: f32,
        out: &mut Self::Buf,
    ) -> Result<()> {
        self.check(self.len(x).min(self.len(out)), rows * width, "rms_norm")?;
        self.check(self.len(w), width, "rms_norm weight")?;
        let call = kernels::rb_rms_norm(self.ptr(x), self.ptr(w), self.ptr(out), width as i32, eps);
        self.driver.launch(call, Grid::per_row(rows, NORM_THREADS))
    }

    fn matmul(&self, x: &Self::Buf, w: &Self::Buf, rows: usize, k: usize, n: usize, out: &mut Self::Buf) -> Result<()> {
        self.check(self.len(x), rows * k, "matmul input")?;
        self.check(self.len(w), n * k, "matmul weight")?;
        self.check(self.len(out), rows * n, "matmul output")?;
        let (xp, wp, op) = (self.ptr(x), self.ptr(w), self.ptr(out));
        let (r, ki, ni) = (rows as i32, k as i32, n as i32);
        if rows <= GEMV_ROWS {
            return self
                .driver
                .launch(kernels::rb_gemv(xp, wp, op, r, ki, ni), Grid::gemv(n, D::WARP));
        }
        if let Some(done) = self.driver.vendor_matmul(x, w, (rows, k, n), out) {
            return done;
        }
        self.driver
            .launch(kernels::rb_matmul(xp, wp, op, r, ki, ni), Grid::tiles(rows, n))
    }

    fn rope(
        &self,
        x: &mut Self::Buf,
        heads: usize,
        head_dim: usize,
        positions: Src<f32>,
        freqs: RopeFreqs<Self::Table>,
    ) -> Result<()> {
        let (n, pos) = self.rope_positions(positions)?;
        self.check(self.len(x), n * heads * head_dim, "rope")?;
        let (base, table, neox, mscale) = self.rope_args(freqs);
        let (rows, h, hd) = (n as i32, heads as i32, head_dim as i32);
        let call = kernels::rb_rope(self.ptr(x), pos, rows, h, hd, base, table, neox, mscale);
        self.driver.launch(call, Grid::linear(n * heads * head_dim / 2, 256))
    }

    fn copy_rows(&self, src: &Self::Buf, dst: &mut Self::Buf, row: Row, rows: usize, width: usize) -> Result<()> {
        self.check(self.len(src), rows * width, "copy_rows source")?;
        let n = rows * width;
        let dst_row = row.resolve(&self.step.get());
        let (target, dyn_row) = if (dst_row + rows) * width > self.len(dst) {
            // A destination past the buffer: launch the copy anyway, aimed at an unmapped
            // address, so the fault is a real device error (the `oob` fault injection uses
            // this; a host check would never show how the device reports it).
            (UNMAPPED, Ptr::NONE)
        } else {
            // A row from the step record moves the destination on the device.
            match row {
                Row::At(r) => (self.ptr_at(dst, r * width), Ptr::NONE),
                Row::StepPos => (self.ptr(dst), self.step_field(StepField::Pos)),
                Row::StepSlot => (self.ptr(dst), self.step_field(StepField::Slot)),
            }
        };
        let call = kernels::rb_copy(self.ptr(src), target, n as i64, dyn_row, width as i64);
        self.driver.launch(call, Grid::linear(n, 256))
    }

    fn attention(
        &self,
        q: &Self::Buf,
        k_cache: &Self::Buf,
        v_cache: &Self::Buf,
        s: AttnShape,
        out: &mut Self::Buf,
    ) -> Result<()> {
        let (qw, kvw) = (s.n_head * s.head_dim, s.n_head_kv * s.head_dim);
        if s.from_step && (s.rows != 1 || s.first_pos != self.step.get().pos) {
            return Err(Error::engine(format!(
                "{}: attention from the step record takes one row at the step's position",
                D::NAME
            )));
        }
        self.check(self.len(q).min(self.len(out)), s.rows * qw, "attention")?;
        let cached = self.len(k_cache).min(self.len(v_cache));
        self.check(cached, (s.first_pos + s.rows) * kvw, "attention cache")?;
        let plan = attention_plan(&s, D::NAME)?;
        if !s.from_step {
            if let Some(done) = self.driver.vendor_attention(q, (k_cache, v_cache), s, out) {
                return done;
            }
        }
        let (qp, kp, vp, op) = (self.ptr(q), self.ptr(k_cache), self.ptr(v_cache), self.ptr(out));
        let (rows, nh, nkv, first) = (s.rows as i32, s.n_head as i32, s.n_head_kv as i32, s.first_pos as i32);
        let dyn_first = self.dyn_pos(s.from_step);
        let window = window_arg(s.window);
        match plan {
            AttnPlan::Tiled { kernel, grid } => {
                let call = kernel(qp, kp, vp, op, rows, nh, nkv, first, dyn_first, window);
                self.driver.launch(call, grid)
            }
            AttnPlan::Split {
                part,
                part_grid,
                merge,
                merge_grid,
                splits,
            } => {
                // The plan keeps the partial states within the scratch.
                let scratch = Ptr(self.driver.bytes_addr(&self.attn_part));
                let call = part(qp, kp, vp, scratch, rows, nh, nkv, first, dyn_first, window);
                self.driver.launch(call, part_grid)?;
                self.driver.launch(merge(scratch, op, nh, splits), merge_grid)
            }
        }
    }

    fn silu_mul(&self, gate: &Self::Buf, up: &Self::Buf, n: usize, out: &mut Self::Buf) -> Result<()> {
        self.check(self.len(gate).min(self.len(up)).min(self.len(out)), n, "silu_mul")?;
        let call = kernels::rb_silu_mul(self.ptr(gate), self.ptr(up), self.ptr(out), n as i64);
        self.driver.launch(call, Grid::linear(n, 256))
    }

    fn gelu_tanh_mul(&self, gate: &Self::Buf, up: &Self::Buf, n: usize, out: &mut Self::Buf) -> Result<()> {
        self.check(self.len(gate).min(self.len(up)).min(self.len(out)), n, "gelu_tanh_mul")?;
        let call = kernels::rb_gelu_tanh_mul(self.ptr(gate), self.ptr(up), self.ptr(out), n as i64);
        self.driver.launch(call, Grid::linear(n, 256))
    }

    fn add(&self, a: &Self::Buf, b: &Self::Buf, n: usize, out: &mut Self::Buf) -> Result<()> {
        self.check(self.len(a).min(self.len(b)).min(self.len(out)), n, "add")?;
        let call = kernels::rb_add(self.ptr(a), self.ptr(b), self.ptr(out), n as i64);
        self.driver.launch(call, Grid::linear(n, 256))
    }

    fn add_bias(&self, x: &mut Self::Buf, bias: &Self::Buf, rows: usize, width: usize) -> Result<()> {
        self.check(self.len(x), rows * width, "add_bias")?;
        self.check(self.len(bias), width, "add_bias bias")?;
        let n = rows * width;
        let call = kernels::rb_add_bias(self.ptr(x), self.ptr(bias), n as i64, width as i64);
        self.driver.launch(call, Grid::linear(n, 256))
    }

    fn scale(&self, x: &mut Self::Buf, n: usize, factor: f32) -> Result<()> {
        self.check(self.len(x), n, "scale")?;
        // rb_perturb's kind 0 is exactly x · value, rounded once.
        let (kind, value) = kernels::fault_code(Fault::Scale(factor as f64));
        let call = kernels::rb_perturb(self.ptr(x), 0, n as i64, kind, value);
        self.driver.launch(call, Grid::linear(n, 256))
    }

    fn perturb(&self, x: &mut Self::Buf, rows: usize, width: usize, from_row: usize, fault: Fault) -> Result<()> {
        self.check(self.len(x), rows * width, "perturb")?;
        if from_row >= rows {
            return Ok(());
        }
        let (kind, value) = kernels::fault_code(fault);
        let (start, n) = (from_row * width, (rows - from_row) * width);
        let call = kernels::rb_perturb(self.ptr(x), start as i64, n as i64, kind, value);
        self.driver.launch(call, Grid::linear(n, 256))
    }

    fn argmax(&self, x: &Self::Buf, row: usize, width: usize) -> Result<u32> {
        self.check(self.len(x), (row + 1) * width, "argmax")?;
        let out = self.driver.upload_bytes(&[0u8; 4])?;
        let call = kernels::rb_argmax(
            self.ptr_at(x, row * width),
            width as i32,
            Ptr(self.driver.bytes_addr(&out)),
        );
        self.driver.launch(call, Grid::per_row(1, 1024))?;
        let mut index = [0u8; 4];
        self.driver.read_bytes(&out, &mut index)?;
        Ok(u32::from_le_bytes(index))
    }

    fn argmax_to_step(&self, x: &Self::Buf, row: usize, width: usize, next: Step) -> Result<()> {
        self.check(self.len(x), (row + 1) * width, "argmax")?;
        let call = kernels::rb_argmax_step(
            self.ptr_at(x, row * width),
            width as i32,
            self.step_field(StepField::Token),
            next.pos as i32,
            next.rope_pos,
            next.slot as i32,
        );
        self.driver.launch(call, Grid::per_row(1, 1024))?;
        let queued = self.driver.queue_read_word(&self.step_dev)?;
        self.queued_tokens.borrow_mut().push_back(queued);
        // The host copy keeps the last token it knew: only positions are checked against it.
        self.step.set(Step {
            token: self.step.get().token,
            ..next
        });
        Ok(())
    }

    fn take_token(&self) -> Result<u32> {
        let queued = self.queued_tokens.borrow_mut().pop_front();
        let queued = queued.ok_or_else(|| Error::engine(format!("{}: no token queued", D::NAME)))?;
        Ok(u32::from_le_bytes(self.driver.finish_read_word(queued)?))
    }

    fn sync(&self) -> Result<()> {
        self.driver.sync()
    }

    fn matmul3(
        &self,
        x: &Self::Buf,
        w: [&Self::Buf; 3],
        rows: usize,
        k: usize,
        n: [usize; 3],
        out: [&mut Self::Buf; 3],
    ) -> Result<()> {
        self.dense_projections(Input::Rows(x), w, rows, k, n, out)
    }

    fn matmul3_quant(
        &self,
        x: &Self::Buf,
        w: [&Self::Quant; 3],
        rows: usize,
        k: usize,
        n: [usize; 3],
        out: [&mut Self::Buf; 3],
    ) -> Result<()> {
        self.matmul3_blocks(x, w, rows, k, n, out)
    }

    fn gate_up_silu(
        &self,
        x: Input<Self>,
        wg: &Self::Buf,
        wu: &Self::Buf,
        rows: usize,
        k: usize,
        n: usize,
        g: &mut Self::Buf,
        u: &mut Self::Buf,
        act: &mut Self::Buf,
    ) -> Result<()> {
        self.dense_gate_up_silu(x, wg, wu, rows, k, n, [g, u, act])
    }

    fn rope_append(
        &self,
        q: &mut Self::Buf,
        k: &mut Self::Buf,
        v: &Self::Buf,
        k_cache: &mut Self::Buf,
        v_cache: &mut Self::Buf,
        s: AttnShape,
        positions: Src<f32>,
        freqs: RopeFreqs<Self::Table>,
    ) -> Result<()> {
        let (qw, kvw) = (s.n_head * s.head_dim, s.n_head_kv * s.head_dim);
        let first = if s.from_step { self.step.get().pos } else { s.first_pos };
        self.check(self.len(q), s.rows * qw, "rope_append q")?;
        self.check(self.len(k).min(self.len(v)), s.rows * kvw, "rope_append k, v")?;
        let cached = self.len(k_cache).min(self.len(v_cache));
        self.check(cached, (first + s.rows) * kvw, "rope_append cache")?;
        let (n, pos) = self.rope_positions(positions)?;
        if n != s.rows {
            return Err(Error::engine(format!(
                "{}: rope_append: {n} positions for {} rows",
                D::NAME,
                s.rows
            )));
        }
        let (base, table, neox, mscale) = self.rope_args(freqs);
        let call = kernels::rb_rope_append(
            self.ptr(q),
            self.ptr(k),
            self.ptr(v),
            self.ptr(k_cache),
            self.ptr(v_cache),
            pos,
            s.rows as i32,
            s.n_head as i32,
            s.n_head_kv as i32,
            s.head_dim as i32,
            base,
            self.dyn_pos(s.from_step),
            s.first_pos as i32,
            table,
            neox,
            mscale,
        );
        // The step record's position is the one checked above.
        let threads = s.rows * (qw / 2 + kvw / 2 + kvw);
        self.driver.launch(call, Grid::linear(threads, 256))
    }

    fn add_rms_norm(
        &self,
        a: &Self::Buf,
        b: &Self::Buf,
        w: &Self::Buf,
        rows: usize,
        width: usize,
        eps: f32,
        sum: &mut Self::Buf,
        out: &mut Self::Buf,
    ) -> Result<()> {
        let smallest = [a, b, &*sum, &*out].map(|buf| self.len(buf)).into_iter().min();
        self.check(smallest.unwrap_or(0), rows * width, "add_rms_norm")?;
        self.check(self.len(w), width, "add_rms_norm weight")?;
        let (ap, bp, wp) = (self.ptr(a), self.ptr(b), self.ptr(w));
        let call = kernels::rb_add_rms_norm(ap, bp, wp, self.ptr(sum), self.ptr(out), width as i32, eps);
        self.driver.launch(call, Grid::per_row(rows, NORM_THREADS))
    }

    fn add_rms_norm_project(
        &self,
        norm: AddNorm<Self::Buf>,
        w: Projections<Self>,
        rows: usize,
        k: usize,
        n: [usize; 3],
        out: [&mut Self::Buf; 3],
    ) -> Result<()> {
        match w {
            Projections::Dense(w) => self.dense_projections(Input::AddNorm(norm), w, rows, k, n, out),
            // A quantized matvec's block covers four columns, and every block computing
            // the row's norm cost more than the norm's launch (Q4_K decode 5% slower).
            Projections::Quant(_) => backend::add_rms_norm_project_by_parts(self, norm, w, rows, k, n, out),
        }
    }

    fn set_step(&self, step: Step) -> Result<()> {
        let words = [step.token, step.pos as u32, step.rope_pos.to_bits(), step.slot as u32];
        self.driver.write_bytes(&self.step_dev, bytemuck::cast_slice(&words))?;
        self.step.set(step);
        self.queued_tokens.borrow_mut().clear();
        Ok(())
    }

    fn begin_record(&self) -> Result<bool> {
        self.driver.begin_record()
    }

    fn end_record(&self) -> Result<Option<Self::Graph>> {
        self.driver.end_record()
    }

    fn replay(&self, graph: &Self::Graph) -> Result<()> {
        self.driver.replay(graph)
    }
}

/// The `window` argument of the attention kernels: 0 for the whole prefix.
fn window_arg(window: Option<usize>) -> i32 {
    window.map_or(0, |w| w.min(i32::MAX as usize) as i32)
}

impl<D: Driver> GpuBackend<D> {
    /// The RoPE kernel arguments (base, table, neox, mscale) of `freqs`.
    fn rope_args(&self, freqs: RopeFreqs<D::Bytes>) -> (f32, Ptr, i32, f32) {
        match freqs {
            RopeFreqs::Base(base) => (base, Ptr::NONE, 0, 1.0),
            RopeFreqs::Table { inv_freq, neox, mscale } => {
                (0.0, Ptr(self.driver.bytes_addr(inv_freq)), neox as i32, mscale)
            }
        }
    }
}

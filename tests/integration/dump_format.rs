//! Dump format v1: round trip, atomic files and failed-run manifests, and a reader that
//! refuses hostile manifests, escaping paths and malformed tensor files.

use std::path::Path;
use std::sync::Arc;

use resbisect::dump::{
    BackgroundWriter, Dump, DumpWriter, EngineInfo, FileJob, InFlightRows, Manifest, ModelInfo, PromptRecord, RowBytes,
    Status, TapDType, TapTensor,
};
use resbisect::taps::Selection;
use resbisect::{synth, Error};

use crate::util::*;

fn manifest(prompts: &[(&str, usize)]) -> Manifest {
    let config = synth::preset("tiny").unwrap().config;
    Manifest::new(
        EngineInfo {
            name: "test".into(),
            version: "0".into(),
            backend: "none".into(),
            dtype: "f32".into(),
            device: "none".into(),
            options: None,
            profile: None,
        },
        ModelInfo {
            path: "m.gguf".into(),
            fingerprint: Some("00".into()),
            config,
        },
        prompts
            .iter()
            .map(|(id, n)| PromptRecord {
                id: id.to_string(),
                text: None,
                tokens: (0..*n as u32).collect(),
            })
            .collect(),
        Selection::parse("all", "resid_post", "all", 2).unwrap(),
    )
}

fn resid_rows(layer: usize, positions: &[usize]) -> TapTensor {
    let values: Vec<f32> = positions
        .iter()
        .flat_map(|&p| (0..256).map(move |c| (p * 1000 + c) as f32 + layer as f32 * 0.5))
        .collect();
    TapTensor {
        id: format!("blk.{layer}.resid_post"),
        dtype: TapDType::F32,
        rows: positions.len(),
        width: 256,
        bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

#[test]
fn round_trip_and_failed_run_keeps_partial_dump() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("d");
    let writer = BackgroundWriter::spawn(DumpWriter::create(&root, manifest(&[("p1", 10)]), false).unwrap());
    let positions = Arc::new(vec![0, 3, 9]);
    writer
        .send(FileJob {
            prompt_id: "p1".into(),
            stem: "blk.0".into(),
            positions: positions.clone(),
            taps: vec![resid_rows(0, &positions)],
        })
        .unwrap();
    // The engine dies before layer 1: the file written stays and the manifest says why.
    let err = writer
        .finish(Err(Error::engine("illegal memory access in rms_norm")))
        .unwrap_err();
    assert!(err.to_string().contains("last tap written: blk.0.resid_post"), "{err}");

    let d = Dump::open(&root).unwrap();
    assert_eq!(d.manifest.status, Status::Failed);
    let e = d.manifest.error.as_ref().unwrap();
    assert_eq!(e.message, "illegal memory access in rms_norm");
    assert_eq!(e.tap.as_deref(), Some("blk.0.resid_post"));
    let f = d.read_file("p1", "blk.0").unwrap().unwrap();
    assert_eq!(f.positions, vec![0, 3, 9]);
    assert_eq!(f.taps["blk.0.resid_post"].values[256 + 5], 3005.0);
    assert!(d.read_file("p1", "blk.1").unwrap().is_none());
    let leftovers: Vec<_> = std::fs::read_dir(root.join("data/p1"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "no temporary files remain: {leftovers:?}");

    // An existing dump is only replaced on request, and never an unrelated directory.
    assert!(DumpWriter::create(&root, manifest(&[("p1", 10)]), false).is_err());
    let replacing = DumpWriter::create(&root, manifest(&[("p1", 10)]), true).unwrap();
    // Two runs never write one dump: a second writer is refused while the first lives.
    let err = DumpWriter::create(&root, manifest(&[("p1", 10)]), true).err().unwrap();
    assert!(err.to_string().contains("another run is writing a dump there"), "{err}");
    drop(replacing);
    assert!(DumpWriter::create(&root, manifest(&[("p1", 10)]), true).is_ok());
    let other = dir.path().join("photos");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("cat.jpg"), b"x").unwrap();
    assert!(DumpWriter::create(&other, manifest(&[("p1", 10)]), true).is_err());
    assert!(other.join("cat.jpg").exists());
}

#[test]
fn streamed_files_land_whole_and_match_files_written_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("d");
    let writer = BackgroundWriter::spawn(DumpWriter::create(&root, manifest(&[("p1", 10)]), false).unwrap());
    let positions = vec![0, 3, 4, 9];
    let whole = resid_rows(1, &positions);
    let row = 256 * 4;
    let taps = [("blk.1.resid_post".to_string(), TapDType::F32, 256)];
    let stream = writer.stream_file("p1", "blk.1", &positions, &taps).unwrap();
    // Rows arrive out of order, as prefill chunks and decode steps deliver them; the
    // last still on its way off a device when sent.
    for (first, rows) in [(2, 2), (0, 1)] {
        let mut bytes = writer.buffer();
        bytes.extend_from_slice(&whole.bytes[first * row..(first + rows) * row]);
        writer.send_rows(&stream, 0, first, RowBytes::Ready(bytes)).unwrap();
    }
    writer
        .send_rows(&stream, 0, 1, DeviceCopy::arriving(whole.bytes[row..2 * row].to_vec()))
        .unwrap();
    // A second file that never gets all its rows (the run fails first) leaves nothing.
    let unfinished = writer
        .stream_file(
            "p1",
            "blk.0",
            &positions,
            &[("blk.0.resid_post".to_string(), TapDType::F32, 256)],
        )
        .unwrap();
    writer
        .send_rows(&unfinished, 0, 0, RowBytes::Ready(vec![0; row]))
        .unwrap();
    drop((stream, unfinished));
    let err = writer.finish(Err(Error::engine("device lost"))).unwrap_err();
    assert!(err.to_string().contains("last tap written: blk.1.resid_post"), "{err}");

    let d = Dump::open(&root).unwrap();
    let f = d.read_file("p1", "blk.1").unwrap().unwrap();
    assert_eq!(f.positions, positions);
    let expected: Vec<f64> = whole
        .bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
        .collect();
    assert_eq!(f.taps["blk.1.resid_post"].values, expected);
    assert!(d.read_file("p1", "blk.0").unwrap().is_none());
    let names: Vec<_> = std::fs::read_dir(root.join("data/p1"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["blk.1.safetensors"], "no temporary files remain");
}

/// Rows that a stand-in device delivers a little later, or never (it failed first).
struct DeviceCopy {
    arrives: Option<std::thread::JoinHandle<Vec<u8>>>,
    bytes: Vec<u8>,
}

impl DeviceCopy {
    fn arriving(bytes: Vec<u8>) -> RowBytes {
        let arrives = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            bytes
        });
        RowBytes::InFlight(Box::new(DeviceCopy {
            arrives: Some(arrives),
            bytes: Vec::new(),
        }))
    }

    fn lost() -> RowBytes {
        RowBytes::InFlight(Box::new(DeviceCopy {
            arrives: None,
            bytes: Vec::new(),
        }))
    }
}

impl InFlightRows for DeviceCopy {
    fn wait(&mut self) -> resbisect::Result<&[u8]> {
        match self.arrives.take() {
            Some(copy) => self.bytes = copy.join().unwrap(),
            None if self.bytes.is_empty() => return Err(Error::engine("the device failed before the rows arrived")),
            None => {}
        }
        Ok(&self.bytes)
    }
}

#[test]
fn rows_a_device_never_delivers_fail_the_dump_and_spare_the_other_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("d");
    let writer = BackgroundWriter::spawn(DumpWriter::create(&root, manifest(&[("p1", 10)]), false).unwrap());
    let positions = vec![0, 3];
    let tap = |l: usize| [(format!("blk.{l}.resid_post"), TapDType::F32, 256)];
    let row_bytes = |v: f32| RowBytes::Ready(v.to_le_bytes().repeat(256));
    let (first, second) = (
        writer.stream_file("p1", "blk.0", &positions, &tap(0)).unwrap(),
        writer.stream_file("p1", "blk.1", &positions, &tap(1)).unwrap(),
    );
    writer.send_rows(&first, 0, 0, row_bytes(1.0)).unwrap();
    writer.send_rows(&second, 0, 0, row_bytes(2.0)).unwrap();
    writer.send_rows(&first, 0, 1, DeviceCopy::lost()).unwrap();
    writer
        .send_rows(&second, 0, 1, DeviceCopy::arriving(4f32.to_le_bytes().repeat(256)))
        .unwrap();
    drop((first, second));
    // The engine saw no error: the lost rows alone must keep the dump from being complete.
    let err = writer.finish(Ok(())).unwrap_err();
    assert!(err.to_string().contains("before the rows arrived"), "{err}");
    let d = Dump::open(&root).unwrap();
    assert_eq!(d.manifest.status, Status::Failed);
    assert!(d.read_file("p1", "blk.0").unwrap().is_none());
    assert_eq!(
        d.read_file("p1", "blk.1").unwrap().unwrap().taps["blk.1.resid_post"].values[256],
        4.0
    );
}

fn write_manifest(root: &Path, edit: impl Fn(&mut serde_json::Value)) {
    let mut v = serde_json::to_value(manifest(&[("p1", 10)])).unwrap();
    edit(&mut v);
    std::fs::create_dir_all(root).unwrap();
    std::fs::write(root.join("manifest.json"), serde_json::to_vec(&v).unwrap()).unwrap();
}

#[test]
fn hostile_manifests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("d");
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|v| v["prompts"][0]["id"] = "../../etc".into()),
            "bad prompt id",
        ),
        (Box::new(|v| v["prompts"][0]["id"] = "..".into()), "bad prompt id"),
        (Box::new(|v| v["format"] = "other".into()), "format is \"other\""),
        (Box::new(|v| v["version"] = 2.into()), "version 2 is not supported"),
        (
            Box::new(|v| v["prompts"][0]["tokens"][0] = 5000000.into()),
            "outside the vocabulary",
        ),
        (
            Box::new(|v| v["selection"]["positions"] = "1..x".into()),
            "selection.positions: bad position",
        ),
        (
            Box::new(|v| v["status"] = "exploded".into()),
            "bad manifest: status: expected \"running\", \"complete\" or \"failed\", got \"exploded\"",
        ),
        // Every refusal names the field path and what it expected.
        (
            Box::new(|v| v["model"]["n_layer"] = "x".into()),
            "model.n_layer: expected an integer from 0, got the string \"x\"",
        ),
        (
            Box::new(|v| v["model"]["fingerprint"] = 5.into()),
            "model.fingerprint: expected a string or null, got the number 5",
        ),
        (
            Box::new(|v| {
                v["model"].as_object_mut().unwrap().remove("arch");
            }),
            "model.arch: missing (expected a string)",
        ),
        (
            Box::new(|v| v["prompts"][0]["tokens"][1] = (-1).into()),
            "prompts[0].tokens[1]: expected a token id",
        ),
        (
            Box::new(|v| v["engine"] = serde_json::Value::Null),
            "engine: expected an object, got null",
        ),
        (
            Box::new(|v| v["selection"]["taps"] = serde_json::json!({"all": true})),
            "selection.taps: expected a string or a list, got an object",
        ),
        (
            Box::new(|v| {
                v["prompts"] = serde_json::json!([{"id": "a", "tokens": [1]}, {"id": "a", "tokens": [1]}]);
            }),
            "appears twice",
        ),
    ];
    for (edit, needle) in cases {
        write_manifest(&root, edit);
        assert_refused(&resbisect(&["inspect", path_str(&root)]), needle);
    }
    std::fs::write(root.join("manifest.json"), b"{\"format\": ").unwrap();
    assert_refused(&resbisect(&["inspect", path_str(&root)]), "bad manifest");
}

/// Other writers' spellings: no fingerprint (or null), `selection.taps: "all"`,
/// `selection.positions: ["all"]`, layers as a spec, integers written as floats.
#[test]
fn loose_manifests_from_other_writers_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("d");
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(Edit, &str)> = vec![
        (Box::new(|v| v["model"]["fingerprint"] = serde_json::Value::Null), "(no fingerprint)"),
        (Box::new(|v| { v["model"].as_object_mut().unwrap().remove("fingerprint"); }), "(no fingerprint)"),
        (Box::new(|v| v["selection"]["taps"] = "all".into()), "taps embed,attn_norm,q_pre_rope,k_pre_rope,q,k,v,attn,attn_out,resid_mid,ffn_norm,ffn_gate,ffn_up,ffn_act,ffn_out,resid_post,final_norm,logits"),
        (Box::new(|v| v["selection"]["positions"] = serde_json::json!(["all"])), "positions all"),
        (Box::new(|v| v["selection"]["positions"] = serde_json::json!([0, 1, "4.."])), "positions 0,1,4.."),
        (Box::new(|v| v["selection"]["layers"] = "all".into()), "layers [0, 1]"),
        (Box::new(|v| v["model"]["n_layer"] = 2.0.into()), "layers [0, 1]"),
        (Box::new(|v| { v.as_object_mut().unwrap().remove("selection"); }), "positions all"),
    ];
    for (edit, needle) in cases {
        write_manifest(&root, edit);
        let out = resbisect(&["inspect", path_str(&root)]);
        assert_eq!(out.code, 0, "{}", out.stderr);
        assert!(out.stdout.contains(needle), "{needle:?} not in:\n{}", out.stdout);
    }
}

#[test]
fn malformed_tensor_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("d");
    let w = DumpWriter::create(&root, manifest(&[("p1", 10)]), false).unwrap();
    w.write_file("p1", "blk.0", &[1, 2], &[resid_rows(0, &[1, 2])]).unwrap();
    let file = root.join("data/p1/blk.0.safetensors");
    let good = std::fs::read(&file).unwrap();
    let d = Dump::open(&root).unwrap();

    let expect_err = |bytes: &[u8], needle: &str| {
        std::fs::write(&file, bytes).unwrap();
        let err = d.read_file("p1", "blk.0").unwrap_err().to_string();
        assert!(err.contains(needle), "{err:?} should mention {needle:?}");
    };
    expect_err(&good[..good.len() - 7], "bad safetensors file");
    expect_err(&good[..5], "bad safetensors file");
    expect_err(&[0xff; 64], "bad safetensors file");

    // Well-formed safetensors whose content breaks the dump contract.
    let st = |tensors: Vec<(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)>| {
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .map(|(n, d, s, b)| {
                (
                    n.to_string(),
                    safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize(views, None).unwrap()
    };
    let pos = |ps: &[i64]| ps.iter().flat_map(|p| p.to_le_bytes()).collect::<Vec<u8>>();
    let rows = |n: usize, w: usize| vec![0u8; n * w * 4];
    use safetensors::Dtype::*;
    expect_err(
        &st(vec![
            ("positions", I64, vec![2], pos(&[1, 99])),
            ("blk.0.resid_post", F32, vec![2, 256], rows(2, 256)),
        ]),
        "position 99 is outside",
    );
    expect_err(
        &st(vec![
            ("positions", I64, vec![2], pos(&[3, 1])),
            ("blk.0.resid_post", F32, vec![2, 256], rows(2, 256)),
        ]),
        "not strictly increasing",
    );
    expect_err(
        &st(vec![
            ("positions", I64, vec![2], pos(&[1, 2])),
            ("blk.0.resid_post", F32, vec![2, 255], rows(2, 255)),
        ]),
        "expected [2, 256]",
    );
    expect_err(
        &st(vec![
            ("positions", I64, vec![2], pos(&[1, 2])),
            ("blk.0.resid_post", I32, vec![2, 256], rows(2, 256)),
        ]),
        "dtype",
    );
    expect_err(
        &st(vec![
            ("positions", I64, vec![2], pos(&[1, 2])),
            ("blk.1.resid_post", F32, vec![2, 256], rows(2, 256)),
        ]),
        "belongs in blk.1",
    );
    expect_err(
        &st(vec![
            ("positions", I64, vec![2], pos(&[1, 2])),
            ("blk.0.resid_pots", F32, vec![2, 256], rows(2, 256)),
        ]),
        "not a canonical tap id",
    );
    expect_err(
        &st(vec![("blk.0.resid_post", F32, vec![2, 256], rows(2, 256))]),
        "missing the positions tensor",
    );

    // A link that leaves the dump is not followed.
    std::fs::remove_file(&file).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", &file).unwrap();
    let err = d.read_file("p1", "blk.0").unwrap_err().to_string();
    assert!(err.contains("not a regular file"), "{err}");
    assert!(d.read_file("p1", "../p1/blk.0").is_err());
    assert!(d.read_file("p1", "blk.07").is_err());

    // A prompt's directory that is a link out of the dump, or a tap file that no layer of
    // the model names, makes the dump unreadable rather than silently read in part.
    std::fs::remove_file(&file).unwrap();
    std::fs::write(&file, &good).unwrap();
    let open_err = || Dump::open(&root).err().map(|e| e.to_string()).unwrap_or_default();
    let elsewhere = dir.path().join("elsewhere");
    std::fs::rename(root.join("data/p1"), &elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, root.join("data/p1")).unwrap();
    assert!(
        open_err().contains("links out of the dump are refused"),
        "{}",
        open_err()
    );
    std::fs::remove_file(root.join("data/p1")).unwrap();
    std::fs::rename(&elsewhere, root.join("data/p1")).unwrap();
    let n_layer = manifest(&[("p1", 10)]).model.config.n_layer;
    for stray in [format!("blk.{n_layer}"), "blk.00".to_string(), "notes".to_string()] {
        let path = root.join(format!("data/p1/{stray}.safetensors"));
        std::fs::write(&path, &good).unwrap();
        assert!(
            open_err().contains("not a file of this dump"),
            "{stray}: {}",
            open_err()
        );
        std::fs::remove_file(&path).unwrap();
    }
    assert!(Dump::open(&root).is_ok());
}

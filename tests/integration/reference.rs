//! The reference engine: agreement with HF transformers on the real model (committed
//! fixture), every quant type, f32 against f64, causality across attention chunks,
//! and capture of exactly the selected taps and positions.

use resbisect::dump::{Dump, Status};
use safetensors::SafeTensors;

use crate::util::*;

fn dump(args: &[&str]) -> Dump {
    let out = resbisect(args);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let dir = args[args.iter().position(|a| *a == "-o").unwrap() + 1];
    Dump::open(std::path::Path::new(dir)).unwrap()
}

/// HF transformers (f32, same GGUF) vs the reference on p6_len_32. Tolerance 1e-4 rel
/// L2 per row: the measured disagreement is ≤ 1.3e-5 on every layer and position of an
/// 826-token prompt (fixtures/hf/reference-vs-hf-long_826.json) and ≤ 7e-6 here.
#[test]
fn agrees_with_hf_transformers_on_smollm2() {
    let bytes = std::fs::read(root().join("fixtures/hf/smollm2_p6_len_32.safetensors")).unwrap();
    let fx = SafeTensors::deserialize(&bytes).unwrap();
    let (tokens, positions, pos_spec) = fixture_prompt(&fx);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("d");
    let model = smollm2();
    let d = dump(&[
        "dump",
        "--model",
        path_str(&model),
        "--tokens",
        &tokens,
        "--layers",
        "all",
        "--taps",
        "resid_post,logits",
        "--positions",
        &pos_spec,
        "-o",
        path_str(&out),
    ]);
    let mut checked = 0;
    for (name, view) in fx.tensors() {
        let Some(layer) = name.strip_prefix("blk.").and_then(|r| r.strip_suffix(".resid_post")) else {
            continue;
        };
        let file = d.read_file("prompt", &format!("blk.{layer}")).unwrap().unwrap();
        assert_eq!(file.positions.iter().map(|&p| p as i64).collect::<Vec<_>>(), positions);
        let ours = &file.taps[&name];
        let hf = f32s(view.data());
        for (row, p) in positions.iter().enumerate() {
            let w = ours.width;
            let r = rel_l2(&ours.values[row * w..(row + 1) * w], &hf[row * w..(row + 1) * w]);
            assert!(r <= 1e-4, "{name} position {p}: rel L2 {r:.3e}");
            checked += 1;
        }
    }
    assert!(checked >= 14, "fixture rows checked: {checked}");
    let output = d.read_file("prompt", "output").unwrap().unwrap();
    let logits = &output.taps["logits"];
    let last = &logits.values[(positions.len() - 1) * logits.width..];
    let top_ids = i64s(fx.tensor("logits_top_ids").unwrap().data());
    let top_vals = f32s(fx.tensor("logits_top_values").unwrap().data());
    let ours_top: Vec<f64> = top_ids.iter().map(|&i| last[i as usize]).collect();
    assert!(rel_l2(&ours_top, &top_vals) <= 1e-4);
    let argmax = last.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
    assert_eq!(argmax as i64, top_ids[0], "top-1 token");
}

/// Every quant type loads, dequantizes and runs; f32 and f64 agree closely (their
/// measured gap on these models is below 1e-6 rel L2; 1e-5 leaves headroom).
#[test]
fn every_quant_type_runs_and_f32_matches_f64() {
    let dir = tempfile::tempdir().unwrap();
    for (i, quant) in [
        "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k",
    ]
    .iter()
    .enumerate()
    {
        let model = tiny_model(dir.path(), quant, 10 + i as u64);
        let m = path_str(&model);
        let run = |dtype: &str| {
            let out = dir.path().join(format!("{quant}-{dtype}"));
            dump(&[
                "dump",
                "--model",
                m,
                "--tokens",
                "5,6,7,8,300,301,9",
                "--taps",
                "all",
                "--dtype",
                dtype,
                "-o",
                path_str(&out),
            ])
        };
        let (a, b) = (run("f32"), run("f64"));
        assert_eq!(a.manifest.status, Status::Complete);
        for stem in a.files("prompt").unwrap() {
            let fa = a.read_file("prompt", &stem).unwrap().unwrap();
            let fb = b.read_file("prompt", &stem).unwrap().unwrap();
            for (id, ra) in &fa.taps {
                let rb = &fb.taps[id];
                assert!(
                    ra.values.iter().all(|v| v.is_finite()),
                    "{quant} {id} has non-finite values"
                );
                let r = rel_l2(&ra.values, &rb.values);
                assert!(r <= 1e-5, "{quant} {id}: f32 vs f64 rel L2 {r:.3e}");
            }
        }
    }
}

/// Logits at position p depend only on tokens 0..=p: the full run and a run truncated
/// after p agree, across attention query chunks (128) and positions far from the start.
#[test]
fn causal_across_attention_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "q8_0", 4);
    let m = path_str(&model);
    let tokens: Vec<String> = (0..300).map(|i| ((i * 37 + 11) % 1000 + 3).to_string()).collect();
    let full = dir.path().join("full");
    let d_full = dump(&[
        "dump",
        "--model",
        m,
        "--tokens",
        &tokens.join(","),
        "--taps",
        "logits",
        "--positions",
        "127,128,200",
        "-o",
        path_str(&full),
    ]);
    let rows = d_full.read_file("prompt", "output").unwrap().unwrap();
    for (row, p) in [127usize, 128, 200].iter().enumerate() {
        let cut = dir.path().join(format!("cut{p}"));
        let d = dump(&[
            "dump",
            "--model",
            m,
            "--tokens",
            &tokens[..=*p].join(","),
            "--taps",
            "logits",
            "--positions",
            "last",
            "-o",
            path_str(&cut),
        ]);
        let last = d.read_file("prompt", "output").unwrap().unwrap();
        let w = rows.taps["logits"].width;
        let r = rel_l2(
            &rows.taps["logits"].values[row * w..(row + 1) * w],
            &last.taps["logits"].values,
        );
        assert!(r <= 1e-5, "position {p}: rel L2 {r:.3e}");
    }
}

#[test]
fn captures_only_the_selection_and_fills_the_context() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "q4_k", 5);
    let m = path_str(&model);
    // The tiny preset's whole context (1024 tokens).
    let tokens: Vec<String> = (0..1024).map(|i| ((i * 7 + 1) % 1000 + 3).to_string()).collect();
    let out = dir.path().join("sel");
    let d = dump(&[
        "dump",
        "--model",
        m,
        "--tokens",
        &tokens.join(","),
        "--layers",
        "1",
        "--taps",
        "k,attn,final_norm",
        "--positions",
        "0..4,-2..",
        "-o",
        path_str(&out),
    ]);
    assert_eq!(d.files("prompt").unwrap(), vec!["blk.1", "output"]);
    let blk = d.read_file("prompt", "blk.1").unwrap().unwrap();
    assert_eq!(blk.positions, vec![0, 1, 2, 3, 1022, 1023]);
    assert_eq!(
        blk.taps.keys().cloned().collect::<Vec<_>>(),
        vec!["blk.1.attn", "blk.1.k"]
    );
    assert_eq!(blk.taps["blk.1.k"].width, 128);
    assert_eq!(blk.taps["blk.1.attn"].width, 256);
    let output = d.read_file("prompt", "output").unwrap().unwrap();
    assert_eq!(output.taps.keys().cloned().collect::<Vec<_>>(), vec!["final_norm"]);
    assert!(d.read_file("prompt", "blk.0").unwrap().is_none());
}

#[test]
fn text_prompts_use_the_models_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t");
    let model = smollm2();
    let d = dump(&[
        "dump",
        "--model",
        path_str(&model),
        "--prompts",
        path_str(&root().join("fixtures/prompts/bisect.jsonl")),
        "--layers",
        "0",
        "--taps",
        "embed,resid_post",
        "--positions",
        "last",
        "-o",
        path_str(&out),
    ]);
    let ids: Vec<&str> = d.manifest.prompts.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(
        ids,
        vec!["p0_short", "p6_len_16", "p6_len_32", "p6_len_128", "chat_turn"]
    );
    let lens: Vec<usize> = d.manifest.prompts.iter().map(|p| p.tokens.len()).collect();
    assert_eq!(&lens[1..4], &[16, 32, 128]);
    let chat = &d.manifest.prompts[4];
    assert_eq!(chat.tokens[0], 1, "<|im_start|> is one special token");
    assert_eq!(d.manifest.model.config.n_layer, 30);
}

/// Bisect's reference keeps the residual stream of its first run; later runs over a prefix
/// of the same tokens resume from it (one layer recomputed for its inner taps, none for
/// resid_post and the branch outputs it keeps beside the stream, the head from the last
/// layer's rows) and must match a fresh run of the
/// prefix. 1e-5 rel L2 as in `causal_across_attention_chunks`: a different number of
/// rows changes GEMM blocking, not the math (measured here: ≤ 3e-7).
#[test]
fn runs_over_a_prefix_resume_from_checkpoints() {
    use resbisect::dump::PromptRecord;
    use resbisect::engine::{Engine, Oracle, RefPrecision, ReferenceEngine};
    use resbisect::taps::Selection;

    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model(dir.path(), "q4_k", 8);
    let model = resbisect::model::Model::open(&path).unwrap();
    let oracle = Oracle::load(&model, RefPrecision::F32, &mut |_| {}).unwrap();
    let mut driver = ReferenceEngine::new(&model, RefPrecision::F32.into(), Some(oracle.into()), Vec::new()).unwrap();
    let tokens: Vec<u32> = (0..200).map(|i| (i * 53 + 7) % 1000 + 3).collect();
    let sel = |layers: &[usize], taps: &[&str]| Selection {
        layers: layers.to_vec(),
        taps: taps.iter().map(|t| t.to_string()).collect(),
        positions: resbisect::taps::PositionSpec::all(),
    };
    let full = PromptRecord {
        id: "prompt".into(),
        text: None,
        tokens: tokens.clone(),
    };
    driver
        .dump(
            &full,
            &sel(&[0, 1], &["embed", "resid_post", "final_norm"]),
            &dir.path().join("first"),
        )
        .unwrap();
    let prefix = PromptRecord {
        tokens: tokens[..120].to_vec(),
        ..full
    };
    let joined: Vec<String> = prefix.tokens.iter().map(u32::to_string).collect();
    let mut compared = 0;
    // One layer recomputed for its inner taps; then the branch outputs, read as kept.
    for (name, layers, taps, stems) in [
        (
            "inner",
            "1",
            "embed,attn_norm,q,attn,ffn_act,resid_post,logits",
            &["embed", "blk.1", "output"][..],
        ),
        (
            "branches",
            "0,1",
            "attn_out,ffn_out,resid_post",
            &["blk.0", "blk.1"][..],
        ),
    ] {
        let layer_list: Vec<usize> = layers.split(',').map(|l| l.parse().unwrap()).collect();
        let resumed = dir.path().join(format!("resumed-{name}"));
        driver
            .dump(
                &prefix,
                &sel(&layer_list, &taps.split(',').collect::<Vec<_>>()),
                &resumed,
            )
            .unwrap();
        let fresh = dir.path().join(format!("fresh-{name}"));
        let args = ["--layers", layers, "--taps", taps, "-o", path_str(&fresh)];
        dump(
            &[
                &["dump", "--model", path_str(&path), "--tokens", &joined.join(",")][..],
                &args,
            ]
            .concat(),
        );
        let (a, b) = (Dump::open(&resumed).unwrap(), Dump::open(&fresh).unwrap());
        for stem in stems {
            let (fa, fb) = (
                a.read_file("prompt", stem).unwrap().unwrap(),
                b.read_file("prompt", stem).unwrap().unwrap(),
            );
            assert_eq!(fa.positions, (0..120).collect::<Vec<_>>());
            assert_eq!(
                fa.taps.keys().collect::<Vec<_>>(),
                fb.taps.keys().collect::<Vec<_>>(),
                "{name} {stem}"
            );
            for (id, ta) in &fa.taps {
                let r = rel_l2(&ta.values, &fb.taps[id].values);
                assert!(r <= 1e-5, "{name} {id}: rel L2 {r:.3e}");
                compared += 1;
            }
        }
    }
    assert_eq!(compared, 13);
}

/// `resbisect cut`: the first layers of the real model as a model of its own compute
/// exactly what those layers compute in the full model (same weights, same ops).
#[test]
fn a_cut_model_computes_the_first_layers_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let full = smollm2();
    let cut = dir.path().join("cut.gguf");
    let out = resbisect(&["cut", "--model", path_str(&full), "--layers", "3", "-o", path_str(&cut)]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let sel = [
        "--prompt",
        "The capital of France is",
        "--layers",
        "0,1,2",
        "--taps",
        "embed,attn,resid_post",
    ];
    let a = dump(
        &[
            &["dump", "--model", path_str(&cut), "-o", path_str(&dir.path().join("a"))][..],
            &sel,
        ]
        .concat(),
    );
    let b = dump(
        &[
            &[
                "dump",
                "--model",
                path_str(&full),
                "-o",
                path_str(&dir.path().join("b")),
            ][..],
            &sel,
        ]
        .concat(),
    );
    assert_eq!(a.manifest.model.config.n_layer, 3);
    for stem in ["embed", "blk.0", "blk.1", "blk.2"] {
        let (fa, fb) = (
            a.read_file("prompt", stem).unwrap().unwrap(),
            b.read_file("prompt", stem).unwrap().unwrap(),
        );
        for (id, t) in &fa.taps {
            assert_eq!(t.values, fb.taps[id].values, "{id}");
        }
    }
    // Refusals: no layers, more layers than the model has, an existing output.
    assert_refused(
        &resbisect(&[
            "cut",
            "--model",
            path_str(&full),
            "--layers",
            "0",
            "-o",
            path_str(&dir.path().join("x.gguf")),
        ]),
        "keep 1 to 30",
    );
    assert_refused(
        &resbisect(&[
            "cut",
            "--model",
            path_str(&full),
            "--layers",
            "31",
            "-o",
            path_str(&dir.path().join("x.gguf")),
        ]),
        "keep 1 to 30",
    );
    assert_refused(
        &resbisect(&["cut", "--model", path_str(&full), "--layers", "2", "-o", path_str(&cut)]),
        "exists",
    );
}

/// Local replay recomputes a layer at chosen positions only: its taps there equal the full
/// forward's (positions on both sides of a 128-query attention chunk, the first and the
/// last). 1e-5 rel L2 as above: fewer rows change GEMM blocking, not the math.
#[test]
fn replay_at_chosen_positions_matches_the_full_layer() {
    use resbisect::engine::{Oracle, RefPrecision};

    let dir = tempfile::tempdir().unwrap();
    let path = tiny_model(dir.path(), "q8_0", 5);
    let tokens: Vec<String> = (0..300).map(|i| ((i * 31 + 11) % 1000 + 3).to_string()).collect();
    let full = dump(&[
        "dump",
        "--model",
        path_str(&path),
        "--tokens",
        &tokens.join(","),
        "--layers",
        "0,1",
        "--taps",
        "all",
        "-o",
        path_str(&dir.path().join("full")),
    ]);
    let model = resbisect::model::Model::open(&path).unwrap();
    let replayer = Oracle::load_for_replay(&model, RefPrecision::F32, &[1]).unwrap();
    let (blk0, blk1) = (
        full.read_file("prompt", "blk.0").unwrap().unwrap(),
        full.read_file("prompt", "blk.1").unwrap().unwrap(),
    );
    let input: Vec<f32> = blk0.taps["blk.0.resid_post"].values.iter().map(|&v| v as f32).collect();
    let at = [0usize, 5, 127, 128, 129, 200, 299];
    let replay = replayer.replay_layer(1, &input, 300, &at).unwrap();
    let layer_taps = resbisect::taps::LayerTap::ALL
        .iter()
        .filter(|t| t.in_model(&model.config));
    assert_eq!(replay.len(), layer_taps.count());
    for (id, values) in &replay {
        let t = &blk1.taps[id];
        let expected: Vec<f64> = at
            .iter()
            .flat_map(|&p| t.values[p * t.width..(p + 1) * t.width].iter().copied())
            .collect();
        let got: Vec<f64> = values.iter().map(|&v| v as f64).collect();
        let r = rel_l2(&got, &expected);
        assert!(r <= 1e-5, "{id}: rel L2 {r:.3e}");
    }
    assert!(
        replayer.replay_layer(1, &input, 300, &[5, 5]).is_err(),
        "positions must ascend"
    );
    assert!(
        replayer.replay_layer(1, &input, 300, &[300]).is_err(),
        "positions stay inside the prompt"
    );
}

//! include/resbisect_dump.h's own usage example, cut out of the header as written,
//! compiles warning-free as strict C99 with gcc and clang and writes a dump resbisect
//! reads, stamped with the time it was made.

use std::path::Path;
use std::process::Command;

use crate::util::*;

/// The lines between `EXAMPLE BEGIN` and `EXAMPLE END` of the header's opening comment.
fn header_example() -> String {
    let header = std::fs::read_to_string(root().join("include/resbisect_dump.h")).unwrap();
    let body: Vec<&str> = header
        .lines()
        .skip_while(|l| !l.contains("EXAMPLE BEGIN"))
        .skip(1)
        .take_while(|l| !l.contains("EXAMPLE END"))
        .collect();
    assert!(body.len() > 10, "the header has no EXAMPLE BEGIN/END block");
    body.iter()
        .map(|l| l.strip_prefix(" * ").or_else(|| l.strip_prefix(" *")).unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

fn compile(compiler: &str, src: &Path, exe: &Path) -> Option<()> {
    let out = match Command::new(compiler)
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic", "-I"])
        .arg(root().join("include"))
        .arg("-o")
        .arg(exe)
        .arg(src)
        .output()
    {
        Ok(o) => o,
        Err(_) => return None,
    };
    assert!(
        out.status.success(),
        "{compiler} refuses the header's example:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(())
}

#[test]
fn the_headers_example_compiles_and_writes_a_readable_dump() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "f32", 3);
    let reference = dir.path().join("reference");
    let o = resbisect(&[
        "dump",
        "--model",
        path_str(&model),
        "--tokens",
        "1,17,99,5",
        "--layers",
        "0",
        "-o",
        path_str(&reference),
    ]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reference.join("manifest.json")).unwrap()).unwrap();
    let model_info = dir.path().join("model.json");
    std::fs::write(&model_info, manifest["model"].to_string()).unwrap();
    let n_embd = manifest["model"]["n_embd"].to_string();

    let src = dir.path().join("example.c");
    std::fs::write(&src, header_example()).unwrap();
    let mut compiled = 0;
    for compiler in ["gcc", "clang"] {
        let exe = dir.path().join(format!("example-{compiler}"));
        if compile(compiler, &src, &exe).is_none() {
            assert_ne!(compiler, "gcc", "gcc is needed to compile the C header's example");
            eprintln!("skipping the {compiler} build of the header's example: {compiler} is not installed");
            continue;
        }
        compiled += 1;
        let out = dir.path().join(format!("dump-{compiler}"));
        let status = Command::new(&exe)
            .arg(&out)
            .arg(&model_info)
            .arg(&n_embd)
            .status()
            .unwrap();
        assert!(status.success(), "the example program failed");
        // A second run into the same directory is refused and leaves the dump there as it was.
        let before = std::fs::read(out.join("manifest.json")).unwrap();
        let again = Command::new(&exe)
            .arg(&out)
            .arg(&model_info)
            .arg(&n_embd)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&again.stderr);
        assert!(
            !again.status.success() && said.contains("refusing to write a dump into"),
            "{said}"
        );
        assert_eq!(std::fs::read(out.join("manifest.json")).unwrap(), before);
        let inspect = resbisect(&["inspect", path_str(&out)]);
        assert_eq!(inspect.code, 0, "{}", inspect.stderr);
        assert!(inspect.stdout.contains("blk.0.resid_post"), "{}", inspect.stdout);
        let written: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
        let created = written["created"].as_str().unwrap();
        let year: u32 = created[..4].parse().unwrap();
        assert!(
            year >= 2025 && created.ends_with('Z') && created.len() == 20,
            "created {created:?} is not the time of writing"
        );
        // Its numbers are what the example wrote: row r, channel c holds (r*width + c)/width.
        let d = resbisect::dump::Dump::open(&out).unwrap();
        let f = d.read_file("p0", "blk.0").unwrap().unwrap();
        let width: usize = n_embd.parse().unwrap();
        assert_eq!(
            f.taps["blk.0.resid_post"].values[2 * width + 1] as f32,
            (2 * width + 1) as f32 / width as f32
        );
    }
    assert!(compiled >= 1);

    // A prompt id names a directory under data/: one that would leave the dump is refused
    // before anything is written.
    let src = dir.path().join("bad_id.c");
    std::fs::write(
        &src,
        r#"#define RESBISECT_DUMP_IMPLEMENTATION
#include "resbisect_dump.h"
#include <stdio.h>
int main(int argc, char **argv) {
    if (argc != 3) return 2;
    uint32_t tokens[1] = {1};
    rbd_dump d;
    int rc = rbd_begin(&d, argv[1], "e", "c", "f32", "cpu", argv[2], "../escaped", tokens, 1, "[0]", "[]", "all");
    fputs(rbd_error(&d), stderr);
    return rc ? 2 : 0;
}
"#,
    )
    .unwrap();
    let exe = dir.path().join("bad_id");
    compile("gcc", &src, &exe).expect("gcc compiles the bad-id check");
    let out = dir.path().join("bad-id-dump");
    let run = Command::new(&exe).arg(&out).arg(&model_info).output().unwrap();
    let said = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.code() == Some(2) && said.contains("bad prompt id"), "{said}");
    assert!(!out.exists() && !dir.path().join("escaped").exists());
}

/// tests/engines/typed_writer.c compiled as C99 and as C++ (`-Wall -Wextra -Werror`):
/// the engine's identity (version, options) reaches the manifest and the report's engine
/// line, and f16/bf16 taps read back as the values written.
#[test]
fn the_header_records_identity_and_writes_f16_and_bf16_taps_in_c_and_cpp() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "f32", 3);
    let model_info = dir.path().join("model.json");
    let o = resbisect(&["model-info", path_str(&model), "-o", path_str(&model_info)]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let info: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&model_info).unwrap()).unwrap();
    let width = info["n_embd"].as_u64().unwrap() as usize;
    let src = root().join("tests/engines/typed_writer.c");
    let builds: [(&str, &[&str]); 2] = [
        ("gcc", &["-std=c99", "-pedantic"]),
        ("g++", &["-std=c++17", "-x", "c++"]),
    ];
    for (compiler, flags) in builds {
        let exe = dir.path().join(format!("typed-{compiler}"));
        let out = Command::new(compiler)
            .args(flags)
            .args(["-O2", "-Wall", "-Wextra", "-Werror", "-I"])
            .arg(root().join("include"))
            .arg("-o")
            .arg(&exe)
            .arg(&src)
            .output()
            .unwrap_or_else(|e| panic!("{compiler} is needed to compile the C header: {e}"));
        assert!(
            out.status.success(),
            "{compiler}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dump = dir.path().join(format!("dump-{compiler}"));
        let status = Command::new(&exe)
            .arg(&dump)
            .arg(&model_info)
            .arg(width.to_string())
            .status()
            .unwrap();
        assert!(status.success(), "the typed writer built by {compiler} failed");
        let d = resbisect::dump::Dump::open(&dump).unwrap();
        let engine = &d.manifest.engine;
        assert_eq!(
            (engine.name.as_str(), engine.version.as_str()),
            ("typed-writer", "1.2.3")
        );
        assert_eq!(
            engine.describe(),
            "typed-writer 1.2.3 (cpu f16; cache=q8_0, n_ubatch=32)"
        );
        let f = d.read_file("p0", "blk.0").unwrap().unwrap();
        for id in ["blk.0.resid_post", "blk.0.attn_norm"] {
            let values = &f.taps[id].values;
            assert_eq!(values.len(), 3 * width, "{id}");
            for (i, v) in values.iter().enumerate() {
                assert_eq!(*v, (i % 64) as f64 / 4.0 - 2.0, "{id}[{i}] ({compiler})");
            }
        }
    }
}

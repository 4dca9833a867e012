//! Checkpoints and model folders downloaded from others: every name read from a file stays inside
//! the folder it was read from (native `latest` and manifest entries, DeepSpeed's `latest`, an HF
//! index's `weight_map`, storage keys inside a torch `.pt` zip), else a clear error naming the
//! file, the entry and why — before anything outside is opened. Input errors print no backtrace
//! even with RUST_BACKTRACE=1 (unless `--debug`).
use std::path::Path;
use std::process::{Command, Output};

fn deepscale(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_deepscale"));
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run deepscale")
}

/// The command fails, without a panic, and its error names every one of `names`.
fn refused(out: &Output, names: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "expected an error: {err}");
    assert!(!err.contains("panicked"), "a panic: {err}");
    for n in names {
        assert!(err.contains(n), "the error lacks `{n}`: {err}");
    }
    err
}

/// A small native checkpoint (pretrain-gpt2 --save) in `dir`.
fn native_checkpoint(dir: &Path) {
    let out = deepscale(
        &[
            "pretrain-gpt2",
            "--num-layers",
            "1",
            "--hidden-size",
            "16",
            "--num-attention-heads",
            "2",
            "--seq-length",
            "16",
            "--batch-size",
            "2",
            "--train-iters",
            "1",
            "--eval-iters",
            "1",
            "--sample-length",
            "0",
            "--save",
            dir.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_native_checkpoints_names_stay_inside_it() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    native_checkpoint(&ck);
    let load = |d: &Path| {
        deepscale(
            &[
                "evaluate",
                "--task",
                "loss",
                "--load",
                d.to_str().unwrap(),
                "--text",
                "hi there",
            ],
            &[],
        )
    };
    assert!(load(&ck).status.success(), "the untouched checkpoint loads");
    // `latest` pointing up and out.
    std::fs::write(ck.join("latest"), "../../../etc").unwrap();
    refused(&load(&ck), &["latest", "../../../etc", "goes up"]);
    // An absolute path.
    std::fs::write(ck.join("latest"), "/etc").unwrap();
    refused(&load(&ck), &["latest", "absolute"]);
    // A tag that is a symbolic link to a folder outside.
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), ck.join("elsewhere")).unwrap();
    std::fs::write(ck.join("latest"), "elsewhere").unwrap();
    refused(&load(&ck), &["latest", "symbolic link"]);
    // The manifest's file list naming a file outside the tag.
    std::fs::write(ck.join("latest"), "global_step1").unwrap();
    let manifest = ck.join("global_step1/manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    m["files"][0] = serde_json::json!("../../../../etc/passwd");
    std::fs::write(&manifest, serde_json::to_string(&m).unwrap()).unwrap();
    refused(
        &load(&ck),
        &["manifest.json", "../../../../etc/passwd", "goes up"],
    );
}

#[test]
fn an_hf_index_names_only_shards_inside_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    native_checkpoint(&ck);
    let hf = dir.path().join("hf");
    let out = deepscale(
        &[
            "convert",
            "--load",
            ck.to_str().unwrap(),
            "--to",
            "hf",
            "--output",
            hf.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Replace the single file by an index whose weight_map points outside.
    std::fs::remove_file(hf.join("model.safetensors")).unwrap();
    std::fs::write(
        hf.join("model.safetensors.index.json"),
        r#"{"metadata": {}, "weight_map": {"transformer.wte.weight": "../../../../../etc/hostname"}}"#,
    )
    .unwrap();
    let out = deepscale(
        &[
            "evaluate",
            "--task",
            "loss",
            "--hf-dir",
            hf.to_str().unwrap(),
            "--text",
            "hi",
        ],
        &[],
    );
    refused(
        &out,
        &[
            "model.safetensors.index.json",
            "../../../../../etc/hostname",
            "goes up",
        ],
    );
}

#[test]
fn a_deepspeed_latest_stays_inside_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("latest"), "../../../../etc").unwrap();
    let out = deepscale(
        &[
            "convert",
            "--from",
            "deepspeed",
            "--input",
            dir.path().to_str().unwrap(),
            "--to",
            "native",
            "--output",
            dir.path().join("out").to_str().unwrap(),
        ],
        &[],
    );
    refused(&out, &["latest", "../../../../etc", "goes up"]);
}

/// A torch `.pt` zip whose pickle names a storage outside the archive's data/ folder (written by
/// Python's own pickler, a stand-in `torch` module giving the class references).
#[test]
fn a_torch_zip_names_storages_inside_its_data_folder() {
    let dir = tempfile::tempdir().unwrap();
    let rank = dir.path().join("release/mp_rank_00");
    std::fs::create_dir_all(&rank).unwrap();
    std::fs::write(
        dir.path().join("latest_checkpointed_iteration.txt"),
        "release",
    )
    .unwrap();
    let pt = rank.join("model_optim_rng.pt");
    let script = r#"
import io, pickle, sys, types, zipfile, collections
torch = types.ModuleType("torch"); sys.modules["torch"] = torch
class FloatStorage: pass
FloatStorage.__module__ = "torch"; torch.FloatStorage = FloatStorage
utils = types.ModuleType("torch._utils"); sys.modules["torch._utils"] = utils
def _rebuild_tensor_v2(*a): pass
_rebuild_tensor_v2.__module__ = "torch._utils"; utils._rebuild_tensor_v2 = _rebuild_tensor_v2
torch._utils = utils
class T:
    def __reduce__(self):
        return (_rebuild_tensor_v2, (("storage", "../../evil"), 0, (2,), (1,), False, collections.OrderedDict()))
class P(pickle.Pickler):
    def persistent_id(self, o):
        if isinstance(o, tuple) and len(o) == 2 and o[0] == "storage":
            return ("storage", FloatStorage, o[1], "cpu", 2)
        return None
buf = io.BytesIO()
P(buf, protocol=2).dump({"model": {"language_model": {"embedding": {"word_embeddings": {"weight": T()}}}}})
with zipfile.ZipFile(sys.argv[1], "w") as z:
    z.writestr("archive/data.pkl", buf.getvalue())
    z.writestr("archive/data/0", b"\0" * 8)
"#;
    let out = Command::new("python3")
        .args(["-c", script, pt.to_str().unwrap()])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = deepscale(
        &[
            "convert",
            "--from",
            "megatron",
            "--input",
            dir.path().to_str().unwrap(),
            "--to",
            "native",
            "--output",
            dir.path().join("out").to_str().unwrap(),
        ],
        &[],
    );
    refused(&out, &["model_optim_rng.pt", "../../evil", "data/"]);
}

#[test]
fn input_errors_print_no_backtrace_unless_debug() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "convert",
        "--from",
        "deepspeed",
        "--input",
        dir.path().to_str().unwrap(),
        "--to",
        "native",
        "--output",
        "/tmp/never-written",
    ];
    let out = deepscale(&args, &[("RUST_BACKTRACE", "1")]);
    let err = refused(&out, &["mp_rank_XX_model_states.pt"]);
    assert!(
        !err.contains("stack backtrace") && !err.contains("   0: "),
        "a backtrace after an input error: {err}"
    );
    let mut debug = args.to_vec();
    debug.push("--debug");
    let out = deepscale(&debug, &[("RUST_BACKTRACE", "1")]);
    let err = refused(&out, &["mp_rank_XX_model_states.pt"]);
    assert!(err.contains("   0: "), "--debug keeps the backtrace: {err}");
}

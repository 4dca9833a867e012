//! Checkpoint integrity: the manifest records each file's size and CRC-32, each rank file its own
//! tag, step and layout; `--load` and `deepscale checkpoint verify` refuse damaged files by name
//! (corrupted floats, a rank file from another step, a truncated file, an integer tensor),
//! `latest` and Megatron's tracker must agree, --keep-last prunes partial tags, and the files are
//! readable as the folder is.
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "common/cli.rs"]
mod cli;
use cli::{deepscale, ok, ASSETS};

/// `args` exit with status 1 and an error holding every needle.
fn refused(args: &[&str], needles: &[&str]) -> String {
    let err = cli::refusal(&deepscale(args), args, needles);
    assert!(!err.contains("lm loss:"), "{args:?} trained: {err}");
    err
}

const TRAIN: &[&str] = &[
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
    "--eval-iters",
    "1",
    "--sample-length",
    "0",
    "--world-size",
    "2",
    "--zero-stage",
    "2",
];

/// A dp 2 ZeRO-2 save folder with tags global_step2 and global_step4.
fn saved(root: &Path) -> PathBuf {
    let ck = root.join("ck");
    let mut args = TRAIN.to_vec();
    args.extend([
        "--train-iters",
        "4",
        "--save-interval",
        "2",
        "--save",
        ck.to_str().unwrap(),
    ]);
    ok(&args);
    ck
}

fn resume(ck: &Path) -> Vec<String> {
    let mut args: Vec<String> = TRAIN.iter().map(|s| s.to_string()).collect();
    args.extend(["--train-iters", "6", "--load"].map(String::from));
    args.push(ck.to_str().unwrap().into());
    args
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

const SHARD: &str = "global_step4/mp_rank_00_dp_rank_001.safetensors";

#[test]
fn a_sound_checkpoint_verifies_and_its_files_are_readable_as_the_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = saved(tmp.path());
    let out = ok(&["checkpoint", "verify", ck.to_str().unwrap(), "--json"]);
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["tags"].as_array().unwrap().len(), 2);
    let tag = ck.join("global_step4");
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tag.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["version"], 2);
    let sums = m["checksums"].as_object().unwrap();
    for f in [
        "mp_rank_00_dp_rank_000.safetensors",
        "mp_rank_00_dp_rank_001.safetensors",
        "tokenizer.json",
    ] {
        assert!(sums.contains_key(f), "{f} not summed: {sums:?}");
        let mode = std::fs::metadata(tag.join(f)).unwrap().permissions().mode() & 0o777;
        let folder = std::fs::metadata(&tag).unwrap().permissions().mode() & 0o666;
        assert_eq!(mode, folder, "{f}: {mode:o} vs the folder's {folder:o}");
    }
    // And it resumes.
    let args = resume(&ck);
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
}

#[test]
fn corrupted_floats_are_refused_by_load_and_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = saved(tmp.path());
    // 5,000 floats overwritten in the middle of a rank file, size unchanged.
    let f = ck.join(SHARD);
    let mut bytes = std::fs::read(&f).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 20_000] {
        *b ^= 0x5a;
    }
    std::fs::write(&f, &bytes).unwrap();
    let args = resume(&ck);
    refused(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &["mp_rank_00_dp_rank_001.safetensors", "CRC-32", "damaged"],
    );
    refused(
        &["checkpoint", "verify", ck.to_str().unwrap()],
        &[
            "DAMAGED",
            "mp_rank_00_dp_rank_001.safetensors",
            "CRC-32",
            "1 of 2",
        ],
    );
}

#[test]
fn a_rank_file_from_another_step_or_truncated_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = saved(tmp.path());
    // The same rank's file of step 2 copied over step 4's, manifest sums updated to match (as a
    // hand "repair" would): its own metadata still names step 2.
    let other = tmp.path().join("other");
    copy_dir(&ck, &other);
    std::fs::copy(
        other.join("global_step2/mp_rank_00_dp_rank_001.safetensors"),
        other.join(SHARD),
    )
    .unwrap();
    resum_manifest(
        &other.join("global_step4"),
        "mp_rank_00_dp_rank_001.safetensors",
    );
    let args = resume(&other);
    refused(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[
            "mp_rank_00_dp_rank_001.safetensors",
            "belongs to global_step2",
        ],
    );
    // Truncated.
    let f = ck.join(SHARD);
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 1000]).unwrap();
    refused(
        &[
            "checkpoint",
            "verify",
            ck.join("global_step4").to_str().unwrap(),
        ],
        &["mp_rank_00_dp_rank_001.safetensors", "truncated"],
    );
    // A manifest value of the wrong type: the manifest and the key named.
    let mpath = ck.join("global_step4/manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    m["version"] = "two".into();
    std::fs::write(&mpath, m.to_string()).unwrap();
    refused(
        &[
            "checkpoint",
            "verify",
            ck.join("global_step4").to_str().unwrap(),
        ],
        &[
            "corrupt manifest",
            "manifest.json",
            "`version`: invalid type",
        ],
    );
}

/// A manifest whose model config holds a value of the wrong type: resuming, evaluating and
/// converting name the manifest and the key, before any weight is read.
#[test]
fn a_wrong_type_in_the_manifests_model_config_names_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = saved(tmp.path());
    for tag in ["global_step2", "global_step4"] {
        let mpath = ck.join(tag).join("manifest.json");
        let mut m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
        m["model"]["config"]["hidden_size"] = "sixteen".into();
        std::fs::write(&mpath, m.to_string()).unwrap();
    }
    let needles = &[
        "manifest.json's model.config",
        "`hidden_size`: invalid type: string \"sixteen\"",
    ];
    let args = resume(&ck);
    refused(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        needles,
    );
    let load = ck.to_str().unwrap();
    refused(
        &[
            "evaluate", "--task", "loss", "--load", load, "--text", "a text",
        ],
        needles,
    );
    let out = tmp.path().join("model.safetensors");
    refused(
        &[
            "convert",
            "--load",
            load,
            "--to",
            "safetensors",
            "--output",
            out.to_str().unwrap(),
        ],
        needles,
    );
    assert!(!out.exists());
}

/// Rewrites the manifest's size and CRC-32 of `file` to the file's current bytes.
fn resum_manifest(tag: &Path, file: &str) {
    let mpath = tag.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    let bytes = std::fs::read(tag.join(file)).unwrap();
    let mut h = crc32fast::Hasher::new();
    h.update(&bytes);
    m["checksums"][file] = serde_json::json!({
        "bytes": bytes.len(),
        "crc32": format!("{:08x}", h.finalize()),
    });
    std::fs::write(&mpath, m.to_string()).unwrap();
}

#[test]
fn an_integer_tensor_in_a_rank_file_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = saved(tmp.path());
    let f = ck.join(SHARD);
    let bytes = std::fs::read(&f).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    // Every tensor as it was, the first one's bytes reinterpreted as I32.
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let views: Vec<(String, safetensors::tensor::TensorView)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let t = st.tensor(n).unwrap();
            let dtype = if i == 0 {
                safetensors::Dtype::I32
            } else {
                t.dtype()
            };
            (
                n.clone(),
                safetensors::tensor::TensorView::new(dtype, t.shape().to_vec(), t.data()).unwrap(),
            )
        })
        .collect();
    let out = safetensors::tensor::serialize(views, meta.metadata().clone()).unwrap();
    std::fs::write(&f, out).unwrap();
    resum_manifest(
        &ck.join("global_step4"),
        "mp_rank_00_dp_rank_001.safetensors",
    );
    let args = resume(&ck);
    refused(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[
            "mp_rank_00_dp_rank_001.safetensors",
            &names[0],
            "I32",
            "float tensors only",
        ],
    );
}

#[test]
fn latest_and_the_tracker_must_agree_and_keep_last_prunes_partial_tags() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = saved(tmp.path());
    std::fs::write(ck.join("latest_checkpointed_iteration.txt"), "2").unwrap();
    let args = resume(&ck);
    refused(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &[
            "`latest` names global_step4",
            "latest_checkpointed_iteration.txt",
            "iteration 2",
        ],
    );
    std::fs::write(ck.join("latest_checkpointed_iteration.txt"), "4").unwrap();
    // A save that died before its manifest, from an earlier run.
    let partial = ck.join("global_step3");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("mp_rank_00_dp_rank_000.safetensors"), b"half").unwrap();
    let err =
        String::from_utf8_lossy(&deepscale(&["checkpoint", "verify", ck.to_str().unwrap()]).stderr)
            .into_owned();
    assert!(
        err.contains("partial") && err.contains("global_step3"),
        "{err}"
    );
    let mut args = resume(&ck);
    args.extend(
        [
            "--save",
            ck.to_str().unwrap(),
            "--save-interval",
            "2",
            "--keep-last",
            "1",
        ]
        .map(String::from),
    );
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let mut left: Vec<String> = std::fs::read_dir(&ck)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("global_step"))
        .collect();
    left.sort();
    assert_eq!(left, ["global_step6"]);
}

/// A save that cannot be written (here past `ulimit -f`; a full disk takes the same path) names
/// the file, exits 1, and leaves `latest` on the last complete checkpoint, which still verifies.
#[test]
fn a_save_that_cannot_be_written_names_the_file_and_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let ck = saved(tmp.path());
    let mut args: Vec<String> = resume(&ck);
    args.extend(["--save", ck.to_str().unwrap(), "--save-interval", "1"].map(String::from));
    let cmd = format!(
        "ulimit -f 4000 && exec {} {}",
        env!("CARGO_BIN_EXE_deepscale"),
        args.join(" ")
    );
    let out = Command::new("bash")
        .args(["-c", &cmd])
        .env("DEEPSCALE_ASSETS", ASSETS)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot write")
            && err.contains("global_step5/mp_rank_00_dp_rank_000.safetensors"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(ck.join("latest")).unwrap(),
        "global_step4"
    );
    ok(&["checkpoint", "verify", ck.to_str().unwrap()]);
}

"""python -m ldm_jax.evaluate on tiny random models: the table, JSON, TensorBoard
scalars and restarts; reference statistics; invariance to order, batch size and
device count; a signal test on the shapes set; clear errors for bad input.

The Inception here has random weights, run at 75 px (its smallest input) to stay
fast. Drawn as torchvision draws them, its pool3 features are the same for every
image (a deep random ReLU network collapses its inputs), so FID would be 0 for
anything. Its BatchNorm statistics are therefore set from held-out shapes images
and its BatchNorm biases to 1, which keeps most ReLUs open: random but not
degenerate features, in which distances between image distributions mean
something. A trained checkpoint against its step-0 self would need minutes of
training; the real / corrupted images signal test stands in for it.
"""
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from ldm_jax import evaluate, parallel, sampling
from ldm_jax.data import make_shapes, shapes
from ldm_jax.evaluation import conditions as cond_lib
from ldm_jax.evaluation import fid, generated, inception_features, kid
from ldm_jax.models import inception

torch = pytest.importorskip("torch")
BATCH = 16  # every Inception call and sampling batch: one compile each


def _heldout(seed: int, n: int) -> np.ndarray:
  return np.stack([shapes.example(seed, i, 32, "heldout")[0] for i in range(n)])


def _mesh(devices=None):
  return parallel.make_mesh(ml_collections.ConfigDict(
      dict(mesh=[("data", -1), ("fsdp", 1), ("tensor", 1)])), devices)


@pytest.fixture(scope="module", autouse=True)
def small_inception():
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(inception, "FID_SIZE", 75)
    yield


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Inception weights (pytorch-fid's layout), a tiny CLIP folder, a random txt2img run."""
  from tests.test_clip import _tiny_clip
  from tests.test_inception import _random_reference
  from tests.test_sampling import _save_untrained, load_config
  root = tmp_path_factory.mktemp("eval")
  net = _random_reference(resize=False)
  for m in net.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.momentum = None  # running statistics = those of the calibration batch
      m.reset_running_stats()
  net.train()
  with torch.no_grad():
    x = inception_features.resize(_heldout(5, 16), 75) / 255
    net(torch.from_numpy(x).permute(0, 3, 1, 2).float())
  net.eval()
  for m in net.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.weight.data.fill_(1.0)
      m.bias.data.fill_(1.0)
  torch.save(net.state_dict(), root / "pt_inception.pth")
  (root / "clip").mkdir()
  _tiny_clip(root / "clip")
  _save_untrained(load_config("txt2img"), str(root / "run" / "ldm" / "checkpoints"))
  return dict(root=root, inception=str(root / "pt_inception.pth"), clip=str(root / "clip"),
              workdir=str(root / "run"))


@pytest.fixture(scope="module")
def features(files):
  return inception_features.InceptionFeatures(files["inception"], _mesh())


def _pool3(extract, images):
  return np.concatenate([extract(images[i:i + BATCH])["pool3"]
                         for i in range(0, len(images), BATCH)])


def test_signal_real_images_beat_shuffled_and_blank(features):
  ref = _pool3(features, _heldout(0, 48))
  real = _heldout(1, 48)
  rng = np.random.default_rng(0)
  shuffled = np.stack([im.reshape(-1, 3)[rng.permutation(32 * 32)].reshape(32, 32, 3)
                       for im in real])
  blank = np.full_like(real[:BATCH], 128)  # one feature vector, whatever the number
  mu, sigma = fid.feature_stats(ref)
  got = {name: _pool3(features, x) for name, x in
         (("real", real), ("shuffled", shuffled), ("blank", blank))}
  d = {k: fid.frechet_distance_of_features(f, mu, sigma) for k, f in got.items()}
  k = {k: kid.kernel_inception_distance(f, ref, num_subsets=20, subset_size=BATCH)[0]
       for k, f in got.items()}
  assert d["real"] < d["shuffled"] / 2 and d["real"] < d["blank"] / 2, d
  assert k["real"] < k["shuffled"] / 10 and k["real"] < k["blank"] / 10, k


def test_same_fid_for_any_order_batch_size_and_device_count(features, files):
  images = np.concatenate([_heldout(1, 24), _heldout(2, 8)])
  mu, sigma = fid.feature_stats(_pool3(features, _heldout(0, 32)))
  a = _pool3(features, images)  # 8 devices, batches of 16
  perm = np.random.default_rng(0).permutation(32)
  one = inception_features.InceptionFeatures(files["inception"], _mesh(jax.devices()[:1]))
  b = np.concatenate([one(images[perm][i:i + 8])["pool3"] for i in range(0, 32, 8)])
  b = b[np.argsort(perm)]  # 1 device, batches of 8, another order
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(a).max())
  fa = fid.frechet_distance_of_features(a, mu, sigma)
  assert fid.frechet_distance_of_features(b, mu, sigma) == pytest.approx(fa, rel=1e-5)
  streamed = fid.FeatureStats()
  for lo, hi in ((0, 3), (3, 20), (20, 32)):  # batch by batch, in another split and order
    streamed.update(b[perm][lo:hi])
  whole = fid.FeatureStats().update(b)
  np.testing.assert_allclose(streamed.mean, whole.mean, rtol=1e-12)
  np.testing.assert_allclose(streamed.cov(), whole.cov(), rtol=1e-9, atol=1e-12)


def _main(args):
  """python -m ldm_jax.evaluate ARGS in this process (absl's flags, parsed afresh)."""
  from absl import flags
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["ldm_jax.evaluate", *args])
  return evaluate.main(["ldm_jax.evaluate"])


def test_flag_defaults_are_the_metrics_defaults():
  from absl import flags
  from ldm_jax.evaluation import inception_score
  f = flags.FLAGS
  assert (f["kid_subsets"].default, f["kid_subset_size"].default, f["is_splits"].default) == (
      kid.NUM_SUBSETS, kid.SUBSET_SIZE, inception_score.SPLITS)


def _args(files, *extra):
  return [f"--workdir={files['workdir']}", "--metrics=fid,kid,is,clip_score,prompts",
          "--num=32", f"--batch={BATCH}", "--steps=2", "--kid_subsets=10", "--kid_subset_size=16",
          "--is_splits=2", f"--inception_weights={files['inception']}",
          f"--clip={files['clip']}", *extra]


@pytest.fixture(scope="module")
def command(files):
  """python -m ldm_jax.evaluate on the random txt2img run, two guidance scales:
  (its result, what it printed)."""
  import contextlib
  import io
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    out = _main(_args(files, "--guidance=1,3"))
  return out, printed.getvalue()


def test_command_table_json_tensorboard(files, command):
  out, printed = command
  assert "| guidance | FID | KID x 10^3 | IS | CLIP score | prompts c+k+p % |" in printed
  assert "\n| 1 | " in printed and "\n| 3 | " in printed
  rows = out["rows"]
  assert [r["guidance"] for r in rows] == [1.0, 3.0]
  for r in rows:
    assert r["fid"] > 0 and np.isfinite(r["kid"]) and 1 <= r["is"] <= 1008
    assert 0 <= r["clip_score"] <= 100 and r["sampled_batches"] == 2 and r["num"] == 32
    assert 0 <= r["prompts/colour_kind_position"] <= r["prompts/kind"] <= 1
  assert rows[0]["fid"] != rows[1]["fid"]  # another guidance, other images
  wd = files["workdir"]
  saved = json.load(open(os.path.join(wd, "eval", "results_step0.json")))
  assert saved["rows"][1]["fid"] == rows[1]["fid"]
  assert os.path.basename(saved["reference"]).startswith("reference_shapes-heldout_r32_n32")
  from tests.test_entrypoints import events
  acc = events(os.path.join(wd, "ldm", "tensorboard"))
  assert acc.Scalars("eval/fid_g3")[0].value == pytest.approx(rows[1]["fid"], rel=1e-6)
  assert {"eval/kid_g1", "eval/is_g1", "eval/clip_score_g3",
          "eval/prompts/colour_kind_position_g3"} <= set(acc.Tags()["scalars"])


@pytest.fixture(scope="module")
def loaded(files):
  """The run's checkpoint restored onto all 8 devices, once for the tests below."""
  return sampling.load(os.path.join(files["workdir"], "ldm", "checkpoints"))


def test_restart_samples_only_unfinished_batches(files, command, loaded, monkeypatch):
  """After the command: the same request again samples nothing; a batch whose file
  is gone (a run killed before writing it) is the only one sampled again."""
  out, _ = command
  want = out["rows"][1]
  task, state, mesh, config = loaded
  metrics = ["fid", "kid", "is", "clip_score"]
  judges = generated.Judges.load(
      metrics, mesh, num=32, text=True, inception_weights=files["inception"], clip=files["clip"],
      reference=fid.load_reference(out["reference"], 2048), kid_subsets=10, kid_subset_size=16,
      is_splits=2)
  conds = cond_lib.conditions_for(task, config, 32, seed=0)
  calls, real_generate = [], sampling.generate
  monkeypatch.setattr(sampling, "generate",
                      lambda *a, **k: calls.append(1) or real_generate(*a, **k))

  def again():
    return generated.evaluate(task, state, mesh, config, metrics, judges, conditions=conds,
                              num=32, out_dir=os.path.join(files["workdir"], "eval"),
                              batch=BATCH, guidance=3.0, steps=2, seed=0)
  got = again()
  assert calls == [] and got["folder"] == want["folder"] and got["sampled_batches"] == 0
  os.remove(os.path.join(want["folder"], "batch_00001.npz"))
  got = again()
  assert len(calls) == 1 and got["sampled_batches"] == 1
  for key in ("fid", "kid", "is", "clip_score"):
    assert got[key] == pytest.approx(want[key], rel=1e-6)


def test_evaluation_samples_equal_on_8_devices_and_1(files, loaded):
  task, state, mesh, config = loaded
  conds = cond_lib.conditions_for(task, config, 32, seed=0)
  got = [generated.sample_batch(task, state, mesh, config, conds, 1, BATCH, seed=0, steps=2,
                                guidance=3.0)]
  one = jax.devices()[:1]  # the same weights on one device (a restore would only cost time)
  got.append(generated.sample_batch(task, jax.device_put(state, one[0]),
                                    parallel.make_mesh(config, one), config, conds, 1, BATCH,
                                    seed=0, steps=2, guidance=3.0))
  assert got[0].shape == (BATCH, 32, 32, 3) and got[0].std() > 0
  assert np.abs(got[0].astype(int) - got[1]).max() <= 1


def test_make_reference_from_shapes_and_shards(files, tmp_path):
  def make(data, num, name):
    out = str(tmp_path / name)
    _main(["--make_reference", f"--data={data}", f"--num={num}", f"--batch={BATCH}",
                   "--resolution=32", f"--out={out}", f"--inception_weights={files['inception']}"])
    return fid.load_reference(out, 2048)

  ref = make("shapes", 32, "shapes.npz")
  assert ref.num == 32 and ref.features.shape == (32, 2048)
  assert ref.meta["data"] == "shapes" and ref.meta["resolution"] == 32
  np.testing.assert_allclose(ref.sigma, np.cov(ref.features.astype(np.float64), rowvar=False),
                             rtol=1e-6, atol=1e-9)
  pattern = make_shapes.write_shards(str(tmp_path / "shards"), 32, 32, split="heldout",
                                     shard_size=16)
  from_shards = make(f"wds:{pattern}", 32, "wds.npz")  # the same images, from other tar files
  np.testing.assert_allclose(from_shards.mu, ref.mu, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="holds fewer than the 48 images read"):
    make(f"wds:{pattern}", 40, "short.npz")


def test_bad_input_fails_with_a_clear_error(files, tmp_path, monkeypatch):
  monkeypatch.delenv(inception_features.ENV, raising=False)
  args = [f"--workdir={files['workdir']}", "--num=32"]
  with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth.*"
                     "github.com/mseitzer.*--inception_weights=PATH or set LDM_INCEPTION_WEIGHTS"):
    _main(args + ["--metrics=fid"])
  with pytest.raises(FileNotFoundError, match="nope.pth' not found"):
    _main(args + ["--metrics=is", f"--inception_weights={tmp_path}/nope.pth"])
  weights = f"--inception_weights={files['inception']}"
  np.savez(tmp_path / "small.npz", mu=np.zeros(64), sigma=np.eye(64))
  with pytest.raises(ValueError, match="small.npz.*64.*2048-d"):
    _main(args + ["--metrics=fid", weights, f"--reference={tmp_path}/small.npz"])
  np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
  with pytest.raises(ValueError, match="KID needs the reference's features"):
    _main(args + ["--metrics=kid", weights, f"--reference={tmp_path}/stats.npz",
                          "--kid_subset_size=8"])
  with pytest.raises(ValueError, match="--num=32 is smaller than the KID subset size "
                     "--kid_subset_size=1000"):
    _main(args + ["--metrics=fid,kid", weights])
  with pytest.raises(ValueError, match="--metrics=fid,lpips: choose from"):
    _main(args + ["--metrics=fid,lpips", weights])
  with pytest.raises(ValueError, match="is_splits=40"):
    _main(args + ["--metrics=is", weights, "--is_splits=40"])
  monkeypatch.delenv("LDM_CLIP", raising=False)
  with pytest.raises(FileNotFoundError, match="--clip=FOLDER or set LDM_CLIP"):
    _main(args + ["--metrics=clip_score"])
  (tmp_path / "captions.txt").write_text("a red circle\n\na blue square\n")
  with pytest.raises(ValueError, match="holds 2 captions; --num=32"):
    _main(args + ["--metrics=is", weights, f"--captions={tmp_path}/captions.txt"])
  with pytest.raises(ValueError, match="--data='lsun'"):
    _main(["--make_reference", "--data=lsun", "--resolution=32", "--out=x.npz", weights])
  with pytest.raises(ValueError, match="the 'prompts' metric judges the shapes held-out "
                     "prompts.*captions"):
    _main(args + ["--metrics=prompts", f"--captions={tmp_path}/captions.txt", "--num=2"])
  # As a user runs it: one line naming the file, no traceback, exit status 2.
  import subprocess
  import sys
  done = subprocess.run([sys.executable, "-m", "ldm_jax.evaluate"] + args + ["--metrics=kid"],
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 2, done.stderr
  assert done.stderr.startswith("ldm_jax.evaluate: error: FID, KID and IS need")
  assert len(done.stderr.strip().splitlines()) == 1


def test_conditions_of_text_class_and_unconditional_models(tmp_path):
  from tests.test_sampling import load_config
  from ldm_jax import config_lib
  from ldm_jax.training.ldm import LDMTask

  def task_of(name, **data):
    c = config_lib.for_stage(load_config(name), "stage2")
    c = ml_collections.ConfigDict(c.to_dict())
    c.data.update(data)
    return LDMTask(c), c

  task, config = task_of("txt2img")
  shapes_prompts = cond_lib.conditions_for(task, config, 6, seed=3)
  assert shapes_prompts.captions_of(0, 8)[6:] == list(shapes_prompts.captions[:2])  # padding
  from ldm_jax.evaluation.prompts import heldout_prompts
  assert list(shapes_prompts.captions) == heldout_prompts(6, 3)[1]
  pattern = make_shapes.write_shards(str(tmp_path / "s"), 5, 32, shard_size=5)
  from_shards = cond_lib.conditions_for(task, config, 4, captions=pattern)
  assert list(from_shards.captions) == [shapes.example(0, i, 32)[1] for i in range(4)]
  (tmp_path / "c.txt").write_text("one\ntwo\n\nthree\n")
  from_file = cond_lib.conditions_for(task, config, 3, captions=str(tmp_path / "c.txt"))
  assert from_file.host_batch(2, 4)["caption"].tolist() == ["three", "one"]
  assert from_file.key() != from_shards.key()
  task, config = task_of("txt2img", source="wds")
  with pytest.raises(ValueError, match="needs --captions"):
    cond_lib.conditions_for(task, config, 4)
  with pytest.raises(ValueError, match="cannot read"):
    cond_lib.conditions_for(task, config, 4, captions=str(tmp_path / "missing-{0..1}.tar"))
  task, config = task_of("class_cond")
  labels = cond_lib.conditions_for(task, config, 12).host_batch(3, 13)["label"]
  np.testing.assert_array_equal(labels, np.arange(3, 13) % 5)  # each class as often
  with pytest.raises(ValueError, match="takes class labels"):
    cond_lib.conditions_for(task, config, 4, captions=str(tmp_path / "c.txt"))
  task, config = task_of("unconditional")
  none = cond_lib.conditions_for(task, config, 4)
  assert none.kind == "none" and len(task.prepare_batch(none.host_batch(0, 4))["image"]) == 4
  task, config = task_of("inpainting")
  with pytest.raises(ValueError, match="concat='inpaint'"):
    cond_lib.conditions_for(task, config, 4)

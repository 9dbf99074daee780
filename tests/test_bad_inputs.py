"""The catalogue of bad inputs: every one exits 2 with ONE stderr line and leaves no output.

Each case runs the real command line (`fedjax_sim.cli.main`) with ``--workdir <tmp>/w`` from a
fresh current folder, and checks: exit code 2; stderr is exactly one line, naming the file, key
or value and what was expected; no traceback; and neither ``<tmp>/w`` nor ``runs/`` exists
afterwards (nothing a later run, or a person, could mistake for output). ``--debug`` shows the
traceback instead.

Data cases damage copies of the real Fashion-MNIST files laid out exactly as the loader expects
(``<data>/fashion-mnist/<name>.gz``), and write small ``.npz`` files for the arrays dataset.
"""

import dataclasses
import gzip
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from helpers import FASHION_MNIST_FILES, SHARED_DATA, needs_shared_data

from fedjax_sim.cli import main
from fedjax_sim.config import Config
from fedjax_sim.data.errors import DataError

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST = SHARED_DATA / "fashion-mnist"
FASHION_CONFIG = str(REPO / "configs" / "fashion_mnist_fedavg.yaml")
FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
LABELS = "train-labels-idx1-ubyte"
LABELS_CONTENT_SHA256 = "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
QUICK = ["rounds=1", "log.progress=false"]  # nothing trains long should a case get that far
ARRAYS = ["demo", "dataset.name=arrays", "dataset.path=data.npz", "model.name=logistic",
          "cohort.size=2", *QUICK]

needs_fashion_mnist = needs_shared_data(*FASHION_MNIST_FILES)


# ----------------------------------------------------------------------------- input makers


# A maker writes a case's files into the test's folder and returns extra overrides.
Maker = Callable[[Path, pytest.MonkeyPatch], list[str]]


def write(name: str, text: str) -> Maker:
    def make(tmp: Path, monkeypatch) -> list[str]:
        (tmp / name).write_text(text)
        return []

    return make


def write_bytes(name: str, content: bytes) -> Maker:
    def make(tmp: Path, monkeypatch) -> list[str]:
        (tmp / name).write_bytes(content)
        return []

    return make


def fashion_mnist_copy(damage: Callable[[bytes], bytes | None], how: str = "data_dir") -> Maker:
    """A data folder with the real files (symlinked) except ``train-labels``, damaged.

    ``damage`` maps the real ``.gz`` bytes to the bytes to write (None: leave the file out).
    ``how``: point the loader at the folder by ``dataset.data_dir`` or ``$FEDJAX_SIM_DATA``.
    """

    def make(tmp: Path, monkeypatch) -> list[str]:
        folder = tmp / "data" / "fashion-mnist"
        folder.mkdir(parents=True)
        for name in FASHION_FILES:
            source = FASHION_MNIST / f"{name}.gz"
            if name != LABELS:
                (folder / f"{name}.gz").symlink_to(source)
            elif (damaged := damage(source.read_bytes())) is not None:
                (folder / f"{name}.gz").write_bytes(damaged)
        if how == "env":
            monkeypatch.setenv("FEDJAX_SIM_DATA", str(tmp / "data"))
            return []
        monkeypatch.delenv("FEDJAX_SIM_DATA", raising=False)
        return [f"dataset.data_dir={tmp / 'data'}"]

    return make


def regzip(change: Callable[[bytearray], None]) -> Callable[[bytes], bytes]:
    def damage(raw: bytes) -> bytes:
        content = bytearray(gzip.decompress(raw))
        change(content)
        return gzip.compress(bytes(content), compresslevel=1)

    return damage


def set_magic(content: bytearray) -> None:
    content[:4] = b"\xde\xad\xbe\xef"


def relabel_first_example(content: bytearray) -> None:
    content[8] = (content[8] + 1) % 10  # still a valid IDX file, but not Zalando's content


def npz(**arrays) -> Maker:
    """Writes ``data.npz`` from ``arrays`` (callables are called for fresh data)."""

    def make(tmp: Path, monkeypatch) -> list[str]:
        np.savez(tmp / "data.npz", **{k: v() if callable(v) else v for k, v in arrays.items()})
        return []

    return make


RNG = np.random.default_rng(0)
X = RNG.normal(size=(60, 4)).astype(np.float32)
Y = RNG.integers(0, 3, 60).astype(np.int32)
CLIENT = np.repeat(np.arange(6), 10)


def with_nan():
    x = X.copy()
    x[7, 2] = np.nan
    return x


def tokens_past_the_vocabulary():
    """Token ids in [0, 5) but for a 5 in every example of client 2 (rows 20-29)."""
    tokens = np.random.default_rng(1).integers(0, 5, X.shape).astype(np.int32)
    tokens[20:30, 1] = 5
    return tokens


# ----------------------------------------------------------------------------- the catalogue

# (id, command line after `fedjax-sim`, files to write into the current folder, fragments the
# one stderr line must contain: the file/key/value and what was expected)
CASES = [
    # configs
    ("unknown-key", ["demo", "client.batchsize=3"], None,
     ["unknown config key 'client.batchsize'", "did you mean 'client.batch_size'"]),
    ("wrong-type", ["demo", "rounds=ten"], None,
     ["config key 'rounds'", "expected an integer", "'ten'"]),
    ("client-learning-rate-zero", ["demo", "client.optimizer.learning_rate=0"], None,
     ["'client.optimizer.learning_rate'", "expected a finite learning rate > 0", "got 0"]),
    ("server-learning-rate-negative", ["demo", "server.optimizer.learning_rate=-1"], None,
     ["'server.optimizer.learning_rate'", "expected a finite learning rate > 0", "got -1"]),
    ("cohort-larger-than-clients", ["demo", "cohort.size=100000", *QUICK], None,
     ["'cohort.size'", "100000", "larger than the number of clients (1390)"]),
    ("batch-size-zero", ["demo", "client.batch_size=0"], None,
     ["'client.batch_size'", "expected an integer >= 1", "got 0"]),
    ("unknown-optimizer", ["demo", "client.optimizer.name=adamm", *QUICK], None,
     ["'client.optimizer.name'", "unknown optax optimizer 'adamm'", "did you mean 'adam'"]),
    ("optimizer-option-bad-value", ["demo", "client.optimizer.momentum=abc", *QUICK], None,
     ["config key 'client.optimizer'", "optax.sgd rejected its options", "'momentum': 'abc'"]),
    ("optimizer-option-misspelt", ["demo", "server.optimizer.learningrate=0.5"], None,
     ["unknown config key 'server.optimizer.learningrate'",
      "did you mean 'server.optimizer.learning_rate'?"]),
    ("unknown-model", ["demo", "model.name=resnet", *QUICK], None,
     ["config key 'model'", "'resnet'", "char_lstm"]),
    ("unknown-dataset", ["demo", "dataset.name=shakespear"], None,
     ["'dataset.name'", "unknown dataset 'shakespear'", "did you mean 'shakespeare'"]),
    ("malformed-override", ["demo", "client..batch_size=3"], None,
     ["malformed override 'client..batch_size=3'", "expected dotted.key=value"]),
    ("yaml-syntax-error", ["run", "bad.yaml"], write("bad.yaml", "rounds: [1,\n"),
     ["config file 'bad.yaml'", "not valid YAML", "line 2"]),
    ("yaml-not-a-mapping", ["run", "list.yaml"], write("list.yaml", "- 1\n- 2\n"),
     ["config file 'list.yaml'", "expected a mapping at the top level"]),
    ("config-file-not-utf8", ["run", "latin1.yaml"],
     write_bytes("latin1.yaml", "name: caf\u00e9\nrounds: 2\n".encode("latin-1")),
     ["config file 'latin1.yaml'", "is not UTF-8 text", "expected a YAML file"]),
    ("config-file-empty", ["run", "empty.yaml"], write("empty.yaml", "# rounds: 3\n"),
     ["config file 'empty.yaml' is empty", "expected a mapping of config keys"]),
    ("config-file-is-a-folder", ["run", "."], None,
     ["config file '.'", "is a folder; expected a YAML file"]),
    ("analytics-config-given-to-run",
     ["run", str(REPO / "configs" / "analytics" / "shakespeare_line_lengths.yaml")], None,
     ["shakespeare_line_lengths.yaml'", "config key 'statistic'", "this is an analytics config",
      "fedjax-sim analytics"]),
    ("config-file-missing", ["run", "no/such/config.yaml"], None,
     ["config file 'no/such/config.yaml' does not exist"]),
    ("unknown-model-option", ["demo", "model.hiden=3", *QUICK], None,
     ["unknown config key 'model.hiden'", "did you mean 'model.hidden'"]),
    ("model-option-bad-value", ["demo", "model.hidden=-5", *QUICK], None,
     ["config key 'model' (char_lstm)", "'hidden': -5", "cannot be built"]),
    ("model-no-lstm-layers", ["demo", "model.num_layers=0", *QUICK], None,
     ["config key 'model' (char_lstm)", "num_layers=0", "expected an integer >= 1"]),
    ("unknown-dataset-option", ["demo", "dataset.sequence_lenght=5", *QUICK], None,
     ["unknown config key 'dataset.sequence_lenght'", "did you mean 'dataset.sequence_length'"]),
    ("bad-dataset-option-value", ["demo", "dataset.test_fraction=1.5", *QUICK], None,
     ["config key 'dataset'", "test_fraction must be in [0, 1)", "1.5"]),
    ("unknown-algorithm", ["demo", "algorithm=fed_avgg"], None,
     ["config key 'algorithm.name'", "unknown algorithm 'fed_avgg'", "did you mean 'fed_avg'"]),
    ("algorithm-option-wrong-type", ["demo", "algorithm=fed_prox", "algorithm.mu=abc", *QUICK],
     None, ["config key 'algorithm.mu'", "expected a number", "'abc'"]),
    ("algorithm-integer-option-fraction", ["demo", "algorithm=ditto",
                                           "algorithm.personal_steps=1.5", *QUICK],
     None, ["config key 'algorithm.personal_steps'", "expected an integer or null", "1.5"]),
    ("scaffold-control-update-unknown",
     ["demo", "algorithm=scaffold", "algorithm.control_update=option_3", *QUICK], None,
     ["config key 'algorithm.control_update'", "'option_3' is not one of",
      "['option_i', 'option_ii']"]),
    ("client-weighting-unknown", ["demo", "client.weighting=abc", *QUICK], None,
     ["config key 'client.weighting'", "'abc'", "'num_examples'"]),
    ("unknown-algorithm-option", ["demo", "algorithm.mu=0.1", *QUICK], None,
     ["unknown config key 'algorithm.mu'", "for algorithm 'fed_avg'",
      "'fed_avg' takes no options"]),
    ("system-dropout-out-of-range", ["demo", "system.dropout=1.5"], None,
     ["config key 'system.dropout'", "expected a number in [0, 1)", "got 1.5"]),
    ("unknown-client-execution", ["demo", "execution.client_execution=gpu"], None,
     ["config key 'execution.client_execution'", "'gpu' is not one of", "'vmap', 'map'"]),
    ("attack-fraction-out-of-range",
     ["demo", "attack.name=sign_flip", "attack.fraction=1.5", *QUICK], None,
     ["config key 'attack.fraction'", "expected a number in [0, 1)"]),
    ("sweep-with-host-client-state",
     ["sweep", str(REPO / "configs" / "sweeps" / "fashion_mnist_fedavg_lr.yaml"),
      "execution.client_state=host"],
     None, ["config key 'execution.client_state'", "'host'", "use replicated"]),
    ("rounds-per-call-zero", ["demo", "execution.rounds_per_call=0"], None,
     ["config key 'execution.rounds_per_call'", "expected an integer >= 1", "got 0"]),
    ("rounds-per-call-with-host-data",
     ["demo", "execution.rounds_per_call=4", "execution.data_placement=host"], None,
     ["config key 'execution.rounds_per_call'", "needs the training data on the device",
      "execution.data_placement: device"]),
    ("eval-every-zero", ["demo", "eval.every=0"], None,
     ["config key 'eval.every'", "expected an integer >= 1", "got 0"]),
    ("log-every-zero", ["demo", "log.every=0"], None,
     ["config key 'log.every'", "expected an integer >= 1", "got 0"]),
    ("checkpoint-keep-zero", ["demo", "checkpoint.keep=0"], None,
     ["config key 'checkpoint.keep'", "expected an integer >= 1", "got 0"]),
    ("seed-negative", ["demo", "seed=-1", *QUICK], None,
     ["config key 'seed'", "expected an integer >= 0", "got -1"]),
    # Fashion-MNIST files
    ("fashion-mnist-missing-file", ["run", FASHION_CONFIG, *QUICK],
     fashion_mnist_copy(lambda raw: None, how="env"),
     [f"{LABELS}.gz", "not found", "fashion-mnist", "FEDJAX_SIM_DATA", "download"]),
    ("fashion-mnist-truncated-gzip", ["run", FASHION_CONFIG, *QUICK],
     fashion_mnist_copy(lambda raw: raw[: len(raw) // 2]),
     [f"{LABELS}.gz", "truncated or corrupt gzip stream", "fetch it again"]),
    ("fashion-mnist-wrong-magic", ["run", FASHION_CONFIG, *QUICK],
     fashion_mnist_copy(regzip(set_magic), how="env"),
     [f"{LABELS}.gz", "not an IDX file", "magic number 0xdeadbeef", "expected 0x0000TTNN"]),
    ("fashion-mnist-checksum-mismatch", ["run", FASHION_CONFIG, *QUICK],
     fashion_mnist_copy(regzip(relabel_first_example)),
     [f"{LABELS}.gz", "sha256", f"expected {LABELS_CONTENT_SHA256}", "fetch it again"]),
    # the arrays dataset (`dataset.name=arrays`, a .npz of your own)
    ("arrays-missing-file", ARRAYS, None,
     ["arrays dataset file", "data.npz", "does not exist", "expected an .npz file",
      "'dataset.path'"]),
    ("arrays-no-examples", ARRAYS, npz(x=X[:0], y=Y[:0], client_id=CLIENT[:0]),
     ["data.npz", "hold no examples", "expected at least one training example"]),
    ("arrays-labels-out-of-range", [*ARRAYS, "dataset.num_classes=2"],
     npz(x=X, y=Y, client_id=CLIENT),
     ["dataset 'arrays'", "split 'train'", "feature 'y'", "outside [0, 2)", "values 2",
      "expected class ids"]),
    ("arrays-negative-labels", ARRAYS, npz(x=X, y=np.where(Y == 1, -1, Y), client_id=CLIENT),
     ["dataset 'arrays'", "split 'train'", "feature 'y'", "values -1", "expected class ids"]),
    ("arrays-nan-features", ARRAYS, npz(x=with_nan, y=Y, client_id=CLIENT),
     ["dataset 'arrays'", "split 'train'", "feature 'x'", "1 non-finite values (1 NaN",
      "expected finite numbers"]),
    ("arrays-token-ids-past-the-vocabulary", [*ARRAYS, "dataset.vocab_size=5"],
     npz(x=tokens_past_the_vocabulary, y=Y, client_id=CLIENT),
     ["dataset 'arrays'", "split 'train'", "feature 'x'", "token ids are outside [0, 5)",
      "(values 5) in 1 of 6 clients (client ids 2;",
      "expected ids in [0, info['vocab_size'] = 5)"]),
    ("arrays-missing-key", ARRAYS, npz(x=X, labels=Y, client_id=CLIENT),
     ["data.npz", "no key 'y'", "keys present: ['client_id', 'labels', 'x']", "expected 'y'"]),
    ("arrays-missing-client-id", ARRAYS, npz(x=X, y=Y),
     ["data.npz", "no key 'client_id'", "partition='natural'", "partition='iid'"]),
    ("arrays-object-array", ARRAYS,
     npz(x=np.array([[1.0], "a"], dtype=object), y=Y[:2], client_id=CLIENT[:2]),
     ["data.npz", "key 'x'", "object (pickled) array", "expected a numeric array"]),
    ("arrays-not-an-npz", ARRAYS, write("data.npz", "x,y\n1,2\n"),
     ["data.npz", "not an .npz archive", "starts with the bytes b'x,y", "expected a zip"]),
    ("arrays-no-path", ARRAYS[:2] + ARRAYS[3:], None,
     ["config key 'dataset' (arrays)", "argument: 'path'"]),
    ("arrays-bad-partition", [*ARRAYS, "dataset.partition=random"],
     npz(x=X, y=Y, client_id=CLIENT),
     ["config key 'dataset'", "partition must be one of", "'random'"]),
    # aggregators and privacy
    ("aggregator-unknown-stage", ["demo", "aggregator=[{name: clipp, norm: 1.0}]", *QUICK], None,
     ["aggregator[0].name", "'clipp'", "did you mean 'clip'"]),
    ("aggregator-unknown-option", ["demo", "aggregator=[{name: clip, nrom: 1.0}]", *QUICK], None,
     ["aggregator[0].nrom", "did you mean 'norm'"]),
    ("aggregator-option-wrong-type", ["demo", "aggregator=[{name: clip, norm: abc}]", *QUICK],
     None, ["config key 'aggregator[0].norm'", "expected a number", "'abc'"]),
    ("aggregator-noise-for-another-cohort",
     ["demo", "aggregator=[{name: clip, norm: 1.0}, {name: mean, denominator: 10}, "
              "{name: gaussian_noise, noise_multiplier: 1.0, noise_cohort_size: 1000}]", *QUICK],
     None, ["config key 'aggregator[2].noise_cohort_size'", "set privacy.noise_cohort_size"]),
    ("aggregator-two-reducers", ["demo", "aggregator=[{name: mean}, {name: sum}]", *QUICK], None,
     ["'aggregator'", "exactly one reducer"]),
    ("privacy-negative-epsilon", ["demo", "privacy.target_epsilon=-1", *QUICK], None,
     ["'privacy.target_epsilon'", "> 0", "-1"]),
    ("privacy-unaccountable-sampler", ["demo", "privacy.noise_multiplier=1.0",
                                       "cohort.sampler=weighted", *QUICK], None,
     ["'cohort.sampler'", "'weighted'", "poisson"]),
    ("privacy-example-dp-negative", ["demo", "privacy.example_noise_multiplier=-0.5", *QUICK],
     None, ["'privacy.example_noise_multiplier'", "finite number >= 0", "-0.5"]),
    ("privacy-example-dp-unaccounted-algorithm",
     ["demo", "algorithm.name=mime", "privacy.example_noise_multiplier=1", *QUICK], None,
     ["'privacy.example_noise_multiplier'", "algorithm 'mime'", "no example-level accounting",
      "'fed_avg'"]),
    # the command line
    ("unknown-command", ["bogus"], None, ["invalid choice: 'bogus'", "demo", "run"]),
    ("missing-config-argument", ["run"], None,
     ["the following arguments are required: config"]),
    ("unknown-flag", ["run", "configs/x.yaml", "--bogus"], None,
     ["unrecognized arguments: --bogus"]),
]

# Known gaps, each a strict xfail: it fails once the library is fixed, to be moved back in.
KNOWN_GAPS: dict[str, str] = {}


def _params():
    for case_id, args, make, fragments in CASES:
        marks = []
        if case_id.startswith("fashion-mnist"):
            marks.append(needs_fashion_mnist)
        if case_id in KNOWN_GAPS:
            marks.append(pytest.mark.xfail(reason=KNOWN_GAPS[case_id], raises=ValueError,
                                           strict=True))
        yield pytest.param(case_id, args, make, fragments, id=case_id, marks=marks)


def _overridden_keys(args: list[str]) -> set[str]:
    return {arg.split("=", 1)[0] for arg in args if "=" in arg and not arg.startswith("-")}


def test_every_config_section_has_a_bad_value_case():
    """A section added to `Config` without a case here fails this (so do duplicate case ids)."""
    ids = [case[0] for case in CASES]
    assert sorted({i for i in ids if ids.count(i) > 1}) == []
    overridden = set().union(*(_overridden_keys(case[1]) for case in CASES))
    for field in dataclasses.fields(Config):
        if field.name in ("name", "workdir"):  # free-form strings: no value is bad
            continue
        covered = [key for key in overridden
                   if key == field.name or key.startswith(f"{field.name}.")]
        assert covered, f"no case sets a bad value of config section {field.name!r}"


@pytest.mark.parametrize("case_id, args, make, fragments", list(_params()))
def test_bad_input_exits_2_with_one_line_and_no_output(
    case_id, args, make, fragments, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    extra = make(tmp_path, monkeypatch) if make is not None else []
    code = main([*args, *extra, "--workdir", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, f"expected one line, got:\n{err}"
    assert err.startswith("fedjax-sim: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    # The message is this case's own: no other case's fragments all match it (a case that
    # reaches a neighbour's check, or fragments too generic to tell cases apart, fail here).
    also = [other for other, _, _, theirs in CASES
            if other != case_id and all(fragment in err for fragment in theirs)]
    assert also == [], f"{err!r} also matches the cases {also}"
    assert not (tmp_path / "w").exists()
    assert not (tmp_path / "runs").exists()


def test_a_workdir_that_cannot_be_created_is_one_line(tmp_path, monkeypatch, capsys):
    """An OSError from the file system (here: a folder inside /proc, which no one can create)
    is one line naming the path, exit 2; --debug still raises it."""
    monkeypatch.chdir(tmp_path)
    args = [*ARRAYS, "--workdir", "/proc/fedjax_sim_test/w"]
    npz(x=X, y=Y, client_id=CLIENT)(tmp_path, monkeypatch)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "'/proc/fedjax_sim_test'" in err and "check that the path can be written" in err
    with pytest.raises(OSError):
        main(["--debug", *args])


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="data.npz.*does not exist"):
        main(["--debug", *ARRAYS, "--workdir", str(tmp_path / "w")])
    assert not (tmp_path / "w").exists()

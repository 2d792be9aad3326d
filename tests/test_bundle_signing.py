"""Signed bundles (issue 17 item 6): ``keygen``, ``export --sign`` and ``sign`` write an Ed25519 signature over the
manifest's exact bytes; given trusted public keys, the loader, the runtime, ``verify``, ``plan`` and the ROS node's
parameters refuse an unsigned bundle, a manifest changed after signing, a signature by an untrusted key, a changed
file and a planted file whose hash was added to the manifest, each with a typed error naming the file and key id.
Without trusted keys a bundle loads as before (a signed one with a warning). The loader cases are torch-free."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from blockpilot.cli import main
from blockpilot.formats.bundle import MANIFEST, BundleError, BundleWriter, describe_bundle, load_bundle
from blockpilot.formats.signing import (
    SIGNATURE,
    KeyFileError,
    ManifestChangedError,
    SignatureError,
    UnsignedBundleError,
    UntrustedKeyError,
    generate_key_pair,
    load_signing_key,
    load_trusted_keys,
    sign_manifest,
)

REFERENCE = Path(__file__).resolve().parents[1] / "models" / "reference"
ENGINE = "engines/orin/lm_step.engine"


class Pair:
    def __init__(self, root: Path, name: str) -> None:
        self.key, self.pub, self.id = generate_key_pair(root, name)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pair]:
    root = tmp_path_factory.mktemp("keys")
    return {"team": Pair(root / "team", "team"), "other": Pair(root / "other", "other")}


def fake_bundle(out: Path, scratch: Path, sign: Path | None) -> Path:
    """A small bundle (the reference model's files and a fake Orin engine), built without torch."""
    scratch.mkdir(parents=True, exist_ok=True)
    (engine := scratch / "lm_step.engine").write_bytes(bytes(range(256)) * 16)
    with BundleWriter(out, tools={"tensorrt": "10.3.0.30"}, sign=sign) as writer:
        writer.add_model(REFERENCE, weights=False)
        writer.add_engine(engine, target="orin", sm=87, role="lm_step", variant="plugin", precision="fp16")
    return out


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Pair]) -> Path:
    root = tmp_path_factory.mktemp("signed")
    return fake_bundle(root / "bundle", root / "scratch", keys["team"].key)


@pytest.fixture
def fresh(signed: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(signed, tmp_path / "bundle"))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_manifest(bundle: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    manifest = json.loads((bundle / MANIFEST).read_text())
    edit(manifest)
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _plant_listed(bundle: Path) -> None:
    """A planted file whose size and hash were added to the manifest: accepted without keys (see below)."""
    planted = bundle / "model/extra.so"
    planted.write_bytes(b"\x7fELF evil plugin")
    _edit_manifest(bundle, lambda m: m["files"].update(
        {"model/extra.so": {"sha256": hashlib.sha256(planted.read_bytes()).hexdigest(),
                                   "bytes": planted.stat().st_size}}))


def _resign_with_other(keys: dict[str, Pair]) -> Callable[[Path], None]:
    def damage(bundle: Path) -> None:
        _plant_listed(bundle)
        sign_manifest(bundle, load_signing_key(keys["other"].key))
    return damage


def _swap_key_id(keys: dict[str, Pair]) -> Callable[[Path], None]:
    """Re-signed by another key, but the record claims the trusted key's id: the signature does not verify."""
    def damage(bundle: Path) -> None:
        _resign_with_other(keys)(bundle)
        record = json.loads((bundle / SIGNATURE).read_text())
        record["key_id"] = keys["team"].id
        (bundle / SIGNATURE).write_text(json.dumps(record))
    return damage


def _corrupt_signature(bundle: Path) -> None:
    record = json.loads((bundle / SIGNATURE).read_text())
    raw = bytearray(base64.b64decode(record["signature"]))
    raw[0] ^= 0x01
    record["signature"] = base64.b64encode(bytes(raw)).decode()
    (bundle / SIGNATURE).write_text(json.dumps(record))


def refusal_cases(keys: dict[str, Pair]) -> dict[str, tuple[Callable[[Path], object], type[BundleError], str]]:
    team, other = keys["team"].id, keys["other"].id
    return {
        "unsigned": (lambda b: (b / SIGNATURE).unlink(), UnsignedBundleError, r"manifest\.sig: missing"),
        "manifest_edited": (lambda b: _edit_manifest(b, lambda m: m.update(precision_map={"lm": "fp8"})),
                            ManifestChangedError, rf"manifest\.json: changed after it was signed by key {team}"),
        "planted_and_listed": (_plant_listed, ManifestChangedError, rf"manifest\.json: changed .* key {team}"),
        "resigned_untrusted": (_resign_with_other(keys), UntrustedKeyError,
                               rf"signed by key {other}, which is not a trusted key \(trusted: {team[:16]}"),
        "key_id_swapped": (_swap_key_id(keys), ManifestChangedError, rf"the signature by key {team} does not verify"),
        "signature_corrupted": (_corrupt_signature, ManifestChangedError,
                                rf"manifest\.sig: the signature by key {team} does not verify"),
        "engine_byte_flipped": (lambda b: _flip_byte(b / ENGINE), BundleError,
                                r"lm_step\.engine: modified \(sha256"),
        "planted_unlisted": (lambda b: (b / "model/extra.so").write_bytes(b"x"), BundleError,
                             r"extra\.so: not listed"),
        "signature_garbage": (lambda b: (b / SIGNATURE).write_text("{"), SignatureError,
                              r"manifest\.sig: not a readable signature"),
    }


CASES = ["unsigned", "manifest_edited", "planted_and_listed", "resigned_untrusted", "key_id_swapped",
         "signature_corrupted", "engine_byte_flipped", "planted_unlisted", "signature_garbage"]


def test_keygen_writes_a_pem_pair(tmp_path: Path, keys: dict[str, Pair]) -> None:
    team = keys["team"]
    assert team.key.stat().st_mode & 0o777 == 0o600
    assert team.key.read_text().startswith("-----BEGIN PRIVATE KEY-----")  # PKCS#8
    assert team.pub.read_text().startswith("-----BEGIN PUBLIC KEY-----")  # SubjectPublicKeyInfo
    assert team.key.parent.stat().st_mode & 0o777 == 0o700
    raw = base64.b64decode("".join(team.pub.read_text().splitlines()[1:-1]))[-32:]  # SPKI DER ends in the raw key
    assert team.id == hashlib.sha256(raw).hexdigest()
    assert load_signing_key(team.key).key_id == team.id
    assert list(load_trusted_keys([team.pub]).keys) == [team.id]
    with pytest.raises(KeyFileError, match=r"team\.key: exists already"):
        generate_key_pair(team.key.parent, "team")
    assert main(["keygen", "--out", str(tmp_path / "k"), "--name", "car", "--json"]) == 0
    assert (tmp_path / "k" / "car.key").stat().st_mode & 0o777 == 0o600


def test_bad_key_files_are_refused_naming_the_file(tmp_path: Path, keys: dict[str, Pair]) -> None:
    (garbage := tmp_path / "garbage.pub").write_text("not a key\n")
    with pytest.raises(KeyFileError, match=r"garbage\.pub: not a PEM file"):
        load_trusted_keys([garbage])
    with pytest.raises(KeyFileError, match=r"team\.key: a private key; trust the public key"):
        load_trusted_keys([keys["team"].key])
    with pytest.raises(KeyFileError, match=r"team\.pub: a public key; --sign takes the private key"):
        load_signing_key(keys["team"].pub)
    with pytest.raises(KeyFileError, match=r"missing\.pub: cannot read"):
        load_trusted_keys([tmp_path / "missing.pub"])
    with pytest.raises(KeyFileError, match=r"team\.pub: a public key"):  # before anything is staged
        BundleWriter(tmp_path / "never", sign=keys["team"].pub)
    assert not (tmp_path / "never").exists() and not list(tmp_path.glob(".never*"))


def test_signed_bundle_loads_with_a_trusted_key(signed: Path, keys: dict[str, Pair]) -> None:
    assert (signed / SIGNATURE).is_file() and SIGNATURE not in load_bundle(signed).files
    both = [keys["other"].pub, keys["team"].pub]
    assert load_bundle(signed, trusted_keys=both).engines()[0].path == ENGINE
    assert f"signature  ed25519 by key {keys['team'].id}" in describe_bundle(signed)


@pytest.mark.parametrize("case", CASES)
def test_loader_refusals(fresh: Path, keys: dict[str, Pair], case: str) -> None:
    damage, error, message = refusal_cases(keys)[case]
    damage(fresh)
    with pytest.raises(error, match=message):
        load_bundle(fresh, trusted_keys=[keys["team"].pub], verify=False)  # trusted keys imply sha256 checks


def test_without_trusted_keys_a_listed_plant_is_accepted_as_before(fresh: Path) -> None:
    _plant_listed(fresh)
    assert "model/extra.so" in load_bundle(fresh).files  # what signing exists to catch


def test_runtime_warns_once_for_a_signed_bundle_without_keys(fresh: Path, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    from blockpilot.runtime.bundle_planner import open_bundle

    unsigned = fake_bundle(tmp_path / "unsigned", tmp_path / "scratch", None)
    with caplog.at_level(logging.WARNING, logger="blockpilot.formats.signing"):
        open_bundle(unsigned)
        assert not caplog.records
        open_bundle(fresh)
        open_bundle(fresh)
    assert len(caplog.records) == 1 and "signature is not checked" in caplog.records[0].getMessage()


def test_sign_command_signs_an_exported_bundle(tmp_path: Path, keys: dict[str, Pair]) -> None:
    bundle = fake_bundle(tmp_path / "b", tmp_path / "scratch", None)
    with pytest.raises(UnsignedBundleError):
        load_bundle(bundle, trusted_keys=[keys["team"].pub])
    assert main(["sign", str(bundle), "--key", str(keys["team"].key)]) == 0
    load_bundle(bundle, trusted_keys=[keys["team"].pub])
    _flip_byte(bundle / ENGINE)
    assert main(["sign", str(bundle), "--key", str(keys["team"].key)]) == 2  # hashes checked before signing


# ---- the runtime and the commands, on an exported reference bundle ----------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Pair]) -> Path:
    from runtime_fixtures import torch_threads

    from blockpilot.demo import SHIPPED_MODEL
    from blockpilot.export.bundle_export import export_bundle

    with torch_threads(1):
        return export_bundle(SHIPPED_MODEL, tmp_path_factory.mktemp("e") / "bundle", sign=keys["team"].key).bundle


def test_signed_bundle_plans_without_torch(exported: Path, keys: dict[str, Pair]) -> None:
    from runtime_fixtures import assert_plans_without_torch

    assert_plans_without_torch("from blockpilot.runtime.sources import open_planner",
                               f"open_planner({str(exported)!r}, decoder=DecoderSettings(name='scaffold'), "
                               f"trusted_keys=[{str(keys['team'].pub)!r}])")


@pytest.mark.parametrize("case", ["unsigned", "resigned_untrusted", "planted_and_listed", "graph_byte_flipped"])
def test_runtime_refuses(exported: Path, tmp_path: Path, keys: dict[str, Pair], case: str) -> None:
    from blockpilot.runtime.bundle_planner import BundleRefusedError
    from blockpilot.runtime.sources import open_planner

    copy = Path(shutil.copytree(exported, tmp_path / "copy"))
    cases = {**refusal_cases(keys), "graph_byte_flipped": (
        lambda b: _flip_byte(b / "graphs/decomposed/lm_step.onnx"), BundleError, r"lm_step\.onnx: modified")}
    damage, error, message = cases[case]
    damage(copy)
    with pytest.raises(BundleRefusedError, match=message) as refused:
        open_planner(copy, trusted_keys=[keys["team"].pub])
    assert type(refused.value.cause) is error


def test_commands_take_trusted_keys(exported: Path, tmp_path: Path, keys: dict[str, Pair],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    from blockpilot.demo import SHIPPED_MODEL

    other = keys["other"]
    assert main(["verify", str(exported), "--trusted-key", str(other.pub)]) == 2
    assert f"signed by key {keys['team'].id}, which is not a trusted key" in capsys.readouterr().err
    image = tmp_path / "grey.png"
    from PIL import Image

    Image.new("RGB", (112, 112), (90, 90, 90)).save(image)
    ego = '{"past": [[-7.5, 0], [-5, 0], [-2.5, 0], [0, 0]], "speed": 5.0, "accel": 0.0}'
    plan = ["plan", "--ego", ego, "--image", str(image)]
    assert main([*plan, "--checkpoint", str(exported), "--trusted-key", str(other.pub),
                 "--trusted-key", str(keys["team"].pub)]) == 0
    assert '"waypoints"' in capsys.readouterr().out
    assert main([*plan, "--checkpoint", str(SHIPPED_MODEL), "--trusted-key", str(other.pub)]) == 2
    assert "a checkpoint carries no signature" in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad_flag:  # argparse's own one-line error
        main([*plan, "--checkpoint", str(exported), "--trusted-key", str(tmp_path / "nope.pub")])
    assert bad_flag.value.code == 2 and "nope.pub: no such key file" in capsys.readouterr().err
    out = tmp_path / "never"
    assert main(["export", "--checkpoint", str(SHIPPED_MODEL), "--out", str(out), "--sign", str(other.pub)]) == 2
    assert "other.pub: a public key; --sign takes the private key" in capsys.readouterr().err and not out.exists()


def test_ros_trusted_keys_param(exported: Path, tmp_path: Path, keys: dict[str, Pair]) -> None:
    from blockpilot.ros_nodes.params import ParamsError, PlannerParams, load_params_file
    from blockpilot.runtime.bundle_planner import BundleRefusedError
    from blockpilot.runtime.sources import open_planner

    params = tmp_path / "planner.yaml"
    params.write_text("blockpilot_planner:\n  ros__parameters:\n"
                      f"    bundle: {exported}\n    trusted_keys: [{keys['other'].pub}, {keys['team'].pub}]\n")
    loaded = load_params_file(params)
    assert loaded.trusted_keys == f"{keys['other'].pub},{keys['team'].pub}"  # a ROS string parameter
    options = loaded.planner_options()
    assert options["trusted_keys"] == [str(keys["other"].pub), str(keys["team"].pub)]
    assert open_planner(loaded.model_path, **options).config is not None
    only_other = loaded.with_changes({"trusted_keys": str(keys["other"].pub)})
    with pytest.raises(BundleRefusedError, match=f"signed by key {keys['team'].id}"):
        open_planner(only_other.model_path, **only_other.planner_options())
    with pytest.raises(ParamsError, match="trusted_keys: checks a signed bundle"):
        PlannerParams(checkpoint="models/reference", trusted_keys=str(keys["team"].pub))
    assert PlannerParams(bundle=str(exported)).planner_options()["trusted_keys"] == []  # as before: unchecked


def test_cryptography_is_needed_only_for_keys(signed: Path, keys: dict[str, Pair],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    code = ("import sys\nfrom blockpilot.formats.bundle import describe_bundle, load_bundle\n"
            f"load_bundle({str(signed)!r}); print(describe_bundle({str(signed)!r}).count('by key'))\n"
            "assert 'cryptography' not in sys.modules, 'cryptography was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "1", done.stderr
    from blockpilot.formats.signing import SigningUnavailableError

    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives", None)  # as if not installed
    with pytest.raises(SigningUnavailableError, match="pip install cryptography"):
        load_bundle(signed, trusted_keys=[keys["team"].pub])


def test_tensorrt_backend_checks_the_signature_before_the_gpu(signed: Path, keys: dict[str, Pair]) -> None:
    from blockpilot.runtime.bundle_planner import BundleRefusedError, planner_from_bundle

    with pytest.raises(BundleRefusedError, match=f"signed by key {keys['team'].id}") as refused:
        planner_from_bundle(signed, backend="tensorrt", trusted_keys=[keys["other"].pub])
    assert isinstance(refused.value.cause, UntrustedKeyError)

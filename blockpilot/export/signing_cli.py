"""``blockpilot keygen`` (an Ed25519 key pair for signing bundles) and ``blockpilot sign`` (sign a bundle exported
before); ``blockpilot export --sign KEY`` signs as it exports. The work is in :mod:`blockpilot.formats.signing`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli_common import add_json_option, emit, existing_dir, existing_path


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``keygen`` and ``sign`` to the ``blockpilot`` subcommands."""
    keygen = sub.add_parser("keygen", help="make an Ed25519 key pair that signs bundles (export --sign; the car "
                                           "trusts the public key: --trusted-key, the node's trusted_keys)")
    keygen.add_argument("--out", required=True, help="directory for NAME.key (private, mode 0600) and NAME.pub")
    keygen.add_argument("--name", default="blockpilot-signing", help="file name of the pair, without suffix")
    add_json_option(keygen)
    keygen.set_defaults(func=run_keygen)
    sign = sub.add_parser("sign", help="sign an exported bundle's manifest (writes BUNDLE/manifest.sig; every "
                                       "file's sha256 is checked first)")
    sign.add_argument("bundle", help="bundle directory")
    sign.add_argument("--key", required=True, help="private key (PKCS#8 PEM, from blockpilot keygen)")
    add_json_option(sign)
    sign.set_defaults(func=run_sign)


def run_keygen(args: argparse.Namespace) -> int:
    from ..formats.signing import generate_key_pair

    private, public, kid = generate_key_pair(Path(args.out), args.name)
    emit(args, {"private_key": str(private), "public_key": str(public), "key_id": kid},
         f"private key  {private}  (mode 0600: keep it on the build machine; export --sign uses it)\n"
         f"public key   {public}  (deploy it to the car: --trusted-key, the planner node's trusted_keys)\n"
         f"key id       {kid}")
    return 0


def run_sign(args: argparse.Namespace) -> int:
    existing_dir("BUNDLE", args.bundle, holding="manifest.json")
    existing_path("--key", args.key)
    from ..formats.bundle import load_bundle
    from ..formats.signing import load_signing_key, sign_manifest

    signer = load_signing_key(args.key)  # a bad key is refused before the bundle is hashed
    bundle = load_bundle(args.bundle)  # sign only what the manifest still describes
    path = sign_manifest(bundle.path, signer)
    emit(args, {"bundle": str(bundle.path), "signature": str(path), "key_id": signer.key_id},
         f"signed       {bundle.path}  ({path.name}, key id {signer.key_id})")
    return 0

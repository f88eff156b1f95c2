"""pyproject.toml: the license is an SPDX expression (PEP 639; setuptools deprecated the TOML table and
warned on every build), and the build backend is new enough to read it."""

from __future__ import annotations

import re
import tomllib
import warnings

from tests.train_helpers import ROOT


def test_the_license_is_an_spdx_string_that_setuptools_reads_without_a_warning(monkeypatch):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(project["project"]["license"], str)
    [setuptools] = [r for r in project["build-system"]["requires"] if r.startswith("setuptools")]
    assert int(re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", setuptools).group(1)) >= 77  # PEP 639 support

    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    monkeypatch.chdir(ROOT)  # readme and package discovery are relative to the project
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), "pyproject.toml")
    assert dist.metadata.license_expression == project["project"]["license"]
    deprecations = [str(w.message) for w in caught if "deprecat" in w.category.__name__.lower()]
    assert not deprecations, deprecations

"""Build hook: napari.yaml lives once, at the repository root, and is copied into the napari_memnet
package at build time (wheel, sdist and editable installs alike), where npe2 looks for it."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.egg_info import egg_info

ROOT = Path(__file__).parent


def _place_manifest() -> None:
    src, dst = ROOT / "napari.yaml", ROOT / "napari_memnet" / "napari.yaml"
    if src.exists():  # an sdist build already has the copy in the package
        shutil.copyfile(src, dst)


class BuildPy(build_py):
    def run(self):
        _place_manifest()
        super().run()


class EggInfo(egg_info):
    def run(self):
        _place_manifest()
        super().run()


setup(cmdclass={"build_py": BuildPy, "egg_info": EggInfo})

"""Packaging for mcsae: reads settings.ini (the nbdev config) with configparser."""
from configparser import ConfigParser
from pathlib import Path

from setuptools import find_packages, setup

cfg = ConfigParser(delimiters=["="])
cfg.read(Path(__file__).parent / "settings.ini", encoding="utf-8")
c = cfg["DEFAULT"]
scripts = [s.strip() for s in c.get("console_scripts", "").split() if s.strip()]
# extras: every `<name>_requirements` line of settings.ini; `dev` also gets all the others
extras = {k[: -len("_requirements")]: c[k].split() for k in c if k.endswith("_requirements") and k != "requirements"}
extras["dev"] = sorted({r for reqs in extras.values() for r in reqs})

setup(
    name=c["lib_name"],
    version=c["version"],
    description=c["description"],
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    author=c["author"],
    author_email=c["author_email"],
    license="Apache-2.0",
    keywords=c["keywords"],
    python_requires=">=" + c["min_python"],
    packages=find_packages(include=[c["lib_path"], c["lib_path"] + ".*"]),
    install_requires=c.get("requirements", "").split(),
    extras_require=extras,
    entry_points={"console_scripts": scripts},
    include_package_data=True,
    zip_safe=False,
)

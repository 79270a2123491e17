"""Double of the WebUI's root launch.py / modules/launch_utils.py (reference section 1)."""
import importlib.metadata
import importlib.util
import json
import os
import shlex
import subprocess
import sys

python = sys.executable
index_url = os.environ.get("INDEX_URL", "")
skip_install = "--skip-install" in sys.argv or os.environ.get("WEBUI_DOUBLE_SKIP_INSTALL") == "1"


def _missing_for_tests():
    return {x.strip() for x in os.environ.get("WEBUI_DOUBLE_MISSING", "").split(",") if x.strip()}


def is_installed(package):
    """True if a distribution named ``package`` exists, else falls back to ``find_spec`` (dist or module name)."""
    if package in _missing_for_tests():
        return False
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        try:
            spec = importlib.util.find_spec(package)
        except ModuleNotFoundError:
            return False
        return spec is not None
    return dist is not None


def run(command, desc=None, errdesc=None, custom_env=None, live=True):
    if desc is not None:
        print(desc)
    result = subprocess.run(command, shell=True, env=os.environ if custom_env is None else custom_env,
                            capture_output=not live, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{errdesc or 'Error running command'}.\nCommand: {command}\nError code: {result.returncode}")
    return result.stdout or ""


def run_pip(command, desc=None, live=False):
    """``"<python>" -m pip <command> --prefer-binary [--index-url]``; no-op with --skip-install."""
    if skip_install:
        return None
    index_url_line = f" --index-url {index_url}" if index_url != "" else ""
    log = os.environ.get("WEBUI_DOUBLE_PIP_LOG")
    if log:  # tests: record instead of installing
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"command": command, "desc": desc}) + "\n")
        return ""
    return run(f'"{python}" -m pip {command} --prefer-binary{index_url_line}', desc=f"Installing {desc}",
               errdesc=f"Couldn't install {desc}", live=live)


def repo_dir(name):
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "repositories", name)


def git_clone(url, dir, name, commithash=None):
    raise RuntimeError("the WebUI double does not clone repositories")


def run_extension_installer(extension_dir):
    """Run ``<extension_dir>/install.py`` as a subprocess with PYTHONPATH=<this folder> prepended."""
    path_installer = os.path.join(extension_dir, "install.py")
    if not os.path.isfile(path_installer):
        return None
    env = os.environ.copy()
    script_path = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = f"{script_path}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return subprocess.run([python, path_installer], cwd=extension_dir, env=env, capture_output=True, text=True)


def list_extensions(settings_file=None):
    return []


def split_cmd_args(text):
    return shlex.split(text)

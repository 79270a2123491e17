"""Double of modules/paths_internal.py (reference section 1): script_path, data_path, models_path."""
import os

script_path = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
data_path = os.environ.get("WEBUI_DOUBLE_DATA_DIR", script_path)
models_path = os.path.join(data_path, "models")
extensions_dir = os.path.join(data_path, "extensions")
extensions_builtin_dir = os.path.join(script_path, "extensions-builtin")
config_states_dir = os.path.join(script_path, "config_states")
default_output_dir = os.path.join(data_path, "outputs")


def set_data_dir(path):
    """Tests: point data_path / models_path at a temporary WebUI data folder."""
    global data_path, models_path, extensions_dir, default_output_dir
    data_path = os.path.abspath(path)
    models_path = os.path.join(data_path, "models")
    extensions_dir = os.path.join(data_path, "extensions")
    default_output_dir = os.path.join(data_path, "outputs")
    from modules import paths
    paths.data_path, paths.models_path, paths.extensions_dir = data_path, models_path, extensions_dir

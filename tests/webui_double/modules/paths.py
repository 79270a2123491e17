"""Double of modules/paths.py: re-exports the paths (``paths.models_path`` etc.)."""
from modules.paths_internal import (data_path, default_output_dir, extensions_builtin_dir, extensions_dir,  # noqa: F401
                                    models_path, script_path)

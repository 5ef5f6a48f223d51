"""The engine must work where napari, Qt and magicgui are absent (CLI, Dask workers, notebooks)."""

import subprocess
import sys
import textwrap

BLOCKED = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "vispy")


def test_samcore_imports_without_gui_packages():
    script = textwrap.dedent(
        f"""
        import importlib, pkgutil, sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {BLOCKED!r}:
                    raise ImportError("blocked GUI package: " + name)

        sys.meta_path.insert(0, Block())
        import samcore
        for module in pkgutil.walk_packages(samcore.__path__, "samcore."):
            if not module.name.endswith("__main__"):  # entry points run when imported
                importlib.import_module(module.name)
        print("imported", len(sys.modules))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "imported" in result.stdout

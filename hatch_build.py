"""Ships the start-up hook ``accm_sorter_autoregister.pth`` in editable installs too.

Regular wheels get it through ``force-include`` in pyproject.toml; hatchling ignores that for
editable wheels, which take ``force_include_editable`` from a build hook instead.
"""

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class CustomBuildHook(BuildHookInterface):
    def initialize(self, version, build_data):
        if version == "editable":
            build_data.setdefault("force_include_editable", {})
            build_data["force_include_editable"]["accm_sorter_autoregister.pth"] = "accm_sorter_autoregister.pth"

"""Importing this module registers the tiny test dataset and model ("tiny_blobs", "tiny_mlp").

Kept for configs and tests that name `sweep_helpers`; new ones should name `sweep_plugin` and
use `sweep_fixtures.clean_zoo` to unregister afterwards (tests that list the zoo's registries
must not see the tiny entries).
"""

import sweep_plugin  # noqa: F401

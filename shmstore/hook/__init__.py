"""``shmstore hook``: the process an agent runs on each event (:mod:`~shmstore.hook.run`),
and its failure log (:mod:`~shmstore.hook.failures`). Importing the package imports
neither."""

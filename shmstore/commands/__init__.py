"""The command line and what it shows people: :mod:`~shmstore.commands.cli` (the parser
and :func:`main`), the commands by topic (:mod:`~shmstore.commands.running`,
:mod:`~shmstore.commands.sessions`, :mod:`~shmstore.commands.setup`), the text for people
(:mod:`~shmstore.commands.render`), the live view (:mod:`~shmstore.commands.top`), the demo
and the user service. Importing the package imports none of them."""

"""The client side: :mod:`~shmstore.clients.client` (the Client and its Watch),
:mod:`~shmstore.clients.proxy` (its connections), :mod:`~shmstore.clients.follow` (a
Follower that outlives the manager), :mod:`~shmstore.clients.shared` (reads from shared
memory) and :mod:`~shmstore.clients.reporter` (the hook's one call, with the standard
library only). Importing the package imports none of them."""

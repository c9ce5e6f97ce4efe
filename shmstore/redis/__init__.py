"""The store in Redis (or Valkey), for agents on several machines: its addresses
(:mod:`~shmstore.redis.address`, standard library only), the store (:mod:`~shmstore.redis.store`),
its Lua scripts (:mod:`~shmstore.redis.scripts`) and the client's proxy to it
(:mod:`~shmstore.redis.proxy`). Importing the package imports none of them (nor redis-py)."""

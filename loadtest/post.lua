-- wrk script for JSON POSTs, the seed's payload:
--   wrk -t10 -c100 -d30s -s loadtest/post.lua http://localhost:8000/items
-- wrk counts every status outside 2xx/3xx as "Non-2xx"; a created item is 201.
wrk.method = "POST"
wrk.body = '{"name":"x","description":"y"}'
wrk.headers["Content-Type"] = "application/json"

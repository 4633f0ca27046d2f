-- The demo services' own database (the order service and the three consumer groups,
-- each in a schema of its own); reliable-msg's database is made by `reliable-msg migrate`.
CREATE DATABASE rmsg_demo;

-- Publishes RabbitMQ refused while it was up (no queue took the message, or it can never
-- go on AMQP), counted so that a refusal that lasts ends in `dead` instead of a retry
-- for ever: a pending message's confirms (reset by requeue), and a delivery's
-- redeliveries in a row (reset by one that is taken, and by requeue).
ALTER TABLE rmsg_message ADD COLUMN refusals integer NOT NULL DEFAULT 0;
ALTER TABLE rmsg_delivery ADD COLUMN refusals integer NOT NULL DEFAULT 0;

/*
 * Publishes N messages to a topic through libembar and reads them back in total order.
 *
 *   cc -o pubsub capi/examples/pubsub.c -Icapi/include -Ltarget/release -lembar
 *   ./pubsub TOPIC N [CONTROL]
 *
 * CONTROL is the control process's "host:port"; without it the library finds it as the
 * `embar` command does ($EMBAR_CONTROL, else the directory of `embar cluster up`).
 * Exits 0 once all N messages came back, in publish order, with consecutive total orders.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "embar.h"

static int fail(const char *what, embar_status s) {
  fprintf(stderr, "pubsub: %s: %s: %s\n", what, embar_status_name(s), embar_last_error());
  return 1;
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: %s TOPIC N [CONTROL]\n", argv[0]);
    return 2;
  }
  const char *topic = argv[1];
  long n = strtol(argv[2], NULL, 10);
  const char *control = argc > 3 ? argv[3] : NULL;
  embar_status s;

  embar_client *client = NULL;
  if ((s = embar_client_connect(control, &client)) != EMBAR_STATUS_OK)
    return fail("connect", s);

  /* Subscribed before publishing, from the next message to be ordered: it sees ours. */
  embar_subscriber *sub = NULL;
  if ((s = embar_subscriber_open(client, topic, EMBAR_START_LATEST, 0, &sub)) != EMBAR_STATUS_OK)
    return fail("subscriber", s);

  embar_publisher *pub = NULL;
  if ((s = embar_publisher_open(client, topic, &pub)) != EMBAR_STATUS_OK)
    return fail("publisher", s);
  /* Handles own what they use: the client can go now. */
  embar_client_free(client);

  char text[64];
  for (long i = 0; i < n; i++) {
    int len = snprintf(text, sizeof text, "message %ld", i);
    uint64_t seq = 0;
    if ((s = embar_publish(pub, (const uint8_t *)text, (size_t)len, &seq)) != EMBAR_STATUS_OK)
      return fail("publish", s);
    if (seq != (uint64_t)i) {
      fprintf(stderr, "pubsub: message %ld got number %llu\n", i, (unsigned long long)seq);
      return 1;
    }
  }
  uint64_t acked = 0;
  if ((s = embar_publisher_wait_acks(pub, 30000, &acked)) != EMBAR_STATUS_OK)
    return fail("wait for acknowledgements", s);
  if (acked != (uint64_t)n) {
    fprintf(stderr, "pubsub: %llu of %ld acknowledged\n", (unsigned long long)acked, n);
    return 1;
  }
  printf("published %ld messages, %llu acknowledged\n", n, (unsigned long long)acked);

  uint64_t first = 0;
  for (long i = 0; i < n; i++) {
    embar_message m;
    s = embar_subscriber_next(sub, 30000, &m);
    if (s == EMBAR_STATUS_AGAIN) {
      fprintf(stderr, "pubsub: %ld of %ld messages came, then none for 30 s\n", i, n);
      return 1;
    }
    if (s != EMBAR_STATUS_OK)
      return fail("subscriber", s);
    if (i == 0)
      first = m.total_order;
    int len = snprintf(text, sizeof text, "message %ld", i);
    if (m.total_order != first + (uint64_t)i || m.payload_len != (size_t)len ||
        memcmp(m.payload, text, (size_t)len) != 0) {
      fprintf(stderr, "pubsub: message %ld: total order %llu, payload \"%.*s\"\n", i,
              (unsigned long long)m.total_order, (int)m.payload_len, (const char *)m.payload);
      return 1;
    }
  }
  printf("received %ld messages in order, total orders %llu..%llu\n", n,
         (unsigned long long)first, (unsigned long long)(first + (uint64_t)n - 1));
  embar_publisher_free(pub);
  embar_subscriber_free(sub);
  return 0;
}

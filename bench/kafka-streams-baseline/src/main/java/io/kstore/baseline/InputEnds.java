package io.kstore.baseline;

import java.util.HashMap;
import java.util.Map;
import java.util.concurrent.Executors;
import java.util.concurrent.ScheduledExecutorService;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLongArray;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.ListOffsetsResult;
import org.apache.kafka.clients.admin.OffsetSpec;
import org.apache.kafka.common.TopicPartition;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * The input's end offsets, looked up once a second, so that an answer can state its lag the way
 * kstore's does ("as of the node's last look at the input's end").
 */
final class InputEnds implements AutoCloseable {
    private static final Logger LOG = LoggerFactory.getLogger(InputEnds.class);

    private final Admin admin;
    private final String topic;
    private final AtomicLongArray ends;
    private final ScheduledExecutorService timer =
            Executors.newSingleThreadScheduledExecutor(r -> {
                Thread thread = new Thread(r, "input-ends");
                thread.setDaemon(true);
                return thread;
            });

    InputEnds(Admin admin, String topic, int partitions) {
        this.admin = admin;
        this.topic = topic;
        this.ends = new AtomicLongArray(partitions);
        for (int p = 0; p < partitions; p++) {
            ends.set(p, -1);
        }
    }

    void start() {
        timer.scheduleWithFixedDelay(this::refresh, 0, 1, TimeUnit.SECONDS);
    }

    /** The partition's end offset as last seen, or -1 before the first look. */
    long end(int partition) {
        return partition < ends.length() ? ends.get(partition) : -1;
    }

    private void refresh() {
        Map<TopicPartition, OffsetSpec> wanted = new HashMap<>();
        for (int p = 0; p < ends.length(); p++) {
            wanted.put(new TopicPartition(topic, p), OffsetSpec.latest());
        }
        try {
            Map<TopicPartition, ListOffsetsResult.ListOffsetsResultInfo> found =
                    admin.listOffsets(wanted).all().get(5, TimeUnit.SECONDS);
            found.forEach((tp, info) -> ends.set(tp.partition(), info.offset()));
        } catch (Exception e) {
            LOG.debug("looking up the input's end offsets failed", e);
        }
    }

    @Override
    public void close() {
        timer.shutdownNow();
    }
}

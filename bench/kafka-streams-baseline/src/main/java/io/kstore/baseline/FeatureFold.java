package io.kstore.baseline;

import java.util.ArrayList;
import java.util.List;
import kstore.v1.Features.Bucket;
import kstore.v1.Features.CustomerFeatures;
import kstore.v1.Features.FeatureWindows;
import kstore.v1.Features.SeenValue;
import kstore.v1.Features.WindowTotals;
import net.openhft.hashing.LongHashFunction;

/**
 * kstore's built-in fold ({@code processor::features::fold} in kstore-server), line for line:
 * the same buckets, windows, caps, horizons and tie-breaks, so that both systems store equal
 * {@code kstore.v1.CustomerFeatures} for every customer. Arithmetic wraps on overflow, as
 * kstore's release build does.
 */
final class FeatureFold {
    static final long MINUTE_MS = 60_000;
    static final long HOUR_MS = 3_600_000;
    static final long DAY_MS = 24 * HOUR_MS;
    /** Minute buckets that make up the 1-hour window. */
    static final long MINUTES_IN_1H = 60;
    /** Hour buckets that make up the 24-hour window. */
    static final long HOURS_IN_24H = 24;
    /** Hour buckets that make up the 7-day window. */
    static final long HOURS_IN_7D = 7 * 24;
    /** How long a delivery address or payment instrument is remembered. */
    static final long DISTINCT_HORIZON_MS = 30 * DAY_MS;
    /** The most values a distinct set keeps. */
    static final int DISTINCT_SET_CAP = 64;
    /** The subscription-abuse rule fires above this many free-delivery addresses in 24 h. */
    static final int ABUSE_DISTINCT_ADDRESSES = 3;

    private static final LongHashFunction XXH3 = LongHashFunction.xx3();

    private FeatureFold() {}

    /** A bucket being updated. */
    private static final class MutableBucket {
        final long index;
        long orders;
        long amountCents;
        long freeDeliveryOrders;

        MutableBucket(long index) {
            this.index = index;
        }

        MutableBucket(Bucket b) {
            this(b.getIndex());
            orders = b.getOrders();
            amountCents = b.getAmountCents();
            freeDeliveryOrders = b.getFreeDeliveryOrders();
        }

        Bucket build() {
            return Bucket.newBuilder()
                    .setIndex(index)
                    .setOrders(orders)
                    .setAmountCents(amountCents)
                    .setFreeDeliveryOrders(freeDeliveryOrders)
                    .build();
        }
    }

    /** A remembered value being updated. */
    private static final class MutableSeen {
        final long hash;
        long lastSeenMs;

        MutableSeen(long hash, long lastSeenMs) {
            this.hash = hash;
            this.lastSeenMs = lastSeenMs;
        }

        SeenValue build() {
            return SeenValue.newBuilder().setHash(hash).setLastSeenMs(lastSeenMs).build();
        }
    }

    /** Folds one event into a customer's features and returns the new features. */
    static CustomerFeatures fold(CustomerFeatures current, OrderEvent event) {
        CustomerFeatures.Builder f = current.toBuilder();
        long t = event.eventTimeMs();
        if (f.getOrdersTotal() == 0) {
            f.setCustomerId(event.customerId());
            f.setFirstSeenMs(t);
            f.setLastSeenMs(t);
        } else {
            f.setFirstSeenMs(Math.min(f.getFirstSeenMs(), t));
            f.setLastSeenMs(Math.max(f.getLastSeenMs(), t));
        }
        f.setOrdersTotal(f.getOrdersTotal() + 1);
        f.setAmountTotalCents(f.getAmountTotalCents() + event.amountCents());
        long now = f.getLastSeenMs();

        FeatureWindows windows = f.getWindows();
        List<MutableBucket> minutes = buckets(windows.getMinuteBucketsList());
        List<MutableBucket> hours = buckets(windows.getHourBucketsList());
        List<MutableSeen> addresses = seen(windows.getAddressesList());
        List<MutableSeen> instruments = seen(windows.getInstrumentsList());
        List<MutableSeen> freeAddresses = seen(windows.getFreeDeliveryAddressesList());

        long free = event.freeDelivery() ? 1 : 0;
        if (bucket(t, HOUR_MS) > bucket(now, HOUR_MS) - HOURS_IN_7D) {
            addToBucket(hours, bucket(t, HOUR_MS), event.amountCents(), free);
            if (bucket(t, MINUTE_MS) > bucket(now, MINUTE_MS) - MINUTES_IN_1H) {
                addToBucket(minutes, bucket(t, MINUTE_MS), event.amountCents(), free);
            }
        } else {
            f.setLateEvents(f.getLateEvents() + 1);
        }
        long minuteFloor = bucket(now, MINUTE_MS) - MINUTES_IN_1H;
        minutes.removeIf(b -> !(b.index > minuteFloor));
        long hourFloor = bucket(now, HOUR_MS) - HOURS_IN_7D;
        hours.removeIf(b -> !(b.index > hourFloor));

        long horizon = now - DISTINCT_HORIZON_MS;
        remember(addresses, event.deliveryAddress(), t, horizon);
        remember(instruments, event.paymentInstrument(), t, horizon);
        long freeHorizon = now - DAY_MS;
        if (event.freeDelivery()) {
            remember(freeAddresses, event.deliveryAddress(), t, freeHorizon);
        } else {
            forgetBefore(freeAddresses, freeHorizon);
        }

        long hours24Floor = bucket(now, HOUR_MS) - HOURS_IN_24H;
        f.setLast1H(totals(minutes, Long.MIN_VALUE, false));
        f.setLast24H(totals(hours, hours24Floor, true));
        f.setLast7D(totals(hours, Long.MIN_VALUE, false));
        long freeOrders24h = 0;
        for (MutableBucket b : hours) {
            if (b.index > hours24Floor) {
                freeOrders24h += b.freeDeliveryOrders;
            }
        }
        f.setFreeDeliveryOrders24H(freeOrders24h);
        f.setDistinctAddresses24H(seenAfter(addresses, now - DAY_MS));
        f.setDistinctAddresses30D(seenAfter(addresses, horizon));
        f.setDistinctInstruments24H(seenAfter(instruments, now - DAY_MS));
        f.setDistinctInstruments30D(seenAfter(instruments, horizon));
        int freeAddresses24h = seenAfter(freeAddresses, freeHorizon);
        f.setFreeDeliveryAddresses24H(freeAddresses24h);
        // Compared as unsigned, like kstore's u32.
        f.setSubscriptionAbuse(Integer.compareUnsigned(freeAddresses24h, ABUSE_DISTINCT_ADDRESSES) > 0);

        FeatureWindows.Builder w = FeatureWindows.newBuilder();
        minutes.forEach(b -> w.addMinuteBuckets(b.build()));
        hours.forEach(b -> w.addHourBuckets(b.build()));
        addresses.forEach(v -> w.addAddresses(v.build()));
        instruments.forEach(v -> w.addInstruments(v.build()));
        freeAddresses.forEach(v -> w.addFreeDeliveryAddresses(v.build()));
        f.setWindows(w.build());
        return f.build();
    }

    /** Returns the index of the bucket of size {@code sizeMs} that holds {@code timeMs}. */
    static long bucket(long timeMs, long sizeMs) {
        // Rust's div_euclid; for a positive divisor the same as floorDiv.
        return Math.floorDiv(timeMs, sizeMs);
    }

    private static List<MutableBucket> buckets(List<Bucket> stored) {
        List<MutableBucket> list = new ArrayList<>(stored.size() + 1);
        for (Bucket b : stored) {
            list.add(new MutableBucket(b));
        }
        return list;
    }

    private static List<MutableSeen> seen(List<SeenValue> stored) {
        List<MutableSeen> list = new ArrayList<>(stored.size() + 1);
        for (SeenValue v : stored) {
            list.add(new MutableSeen(v.getHash(), v.getLastSeenMs()));
        }
        return list;
    }

    /** Adds to the bucket with this index, inserted in index order if new. */
    private static void addToBucket(List<MutableBucket> buckets, long index, long amountCents, long free) {
        int position = 0;
        while (position < buckets.size() && buckets.get(position).index < index) {
            position++;
        }
        MutableBucket bucket;
        if (position < buckets.size() && buckets.get(position).index == index) {
            bucket = buckets.get(position);
        } else {
            bucket = new MutableBucket(index);
            buckets.add(position, bucket);
        }
        bucket.orders += 1;
        bucket.amountCents += amountCents;
        bucket.freeDeliveryOrders += free;
    }

    private static WindowTotals totals(List<MutableBucket> buckets, long floor, boolean filter) {
        long orders = 0;
        long amount = 0;
        for (MutableBucket b : buckets) {
            if (!filter || b.index > floor) {
                orders += b.orders;
                amount += b.amountCents;
            }
        }
        return WindowTotals.newBuilder().setOrders(orders).setAmountCents(amount).build();
    }

    /**
     * Records that {@code value} was seen at {@code t} in a set kept sorted by hash (as an
     * unsigned 64-bit number), drops values last seen at or before {@code horizon}, and evicts
     * the least recently seen (then the smallest hash) beyond the cap.
     */
    private static void remember(List<MutableSeen> set, String value, long t, long horizon) {
        if (t > horizon) {
            long hash = XXH3.hashBytes(OrderJson.utf8(value));
            int position = 0;
            while (position < set.size() && Long.compareUnsigned(set.get(position).hash, hash) < 0) {
                position++;
            }
            if (position < set.size() && set.get(position).hash == hash) {
                MutableSeen seen = set.get(position);
                seen.lastSeenMs = Math.max(seen.lastSeenMs, t);
            } else {
                set.add(position, new MutableSeen(hash, t));
            }
        }
        forgetBefore(set, horizon);
        while (set.size() > DISTINCT_SET_CAP) {
            int oldest = 0;
            for (int i = 1; i < set.size(); i++) {
                MutableSeen candidate = set.get(i);
                MutableSeen best = set.get(oldest);
                int byTime = Long.compare(candidate.lastSeenMs, best.lastSeenMs);
                if (byTime < 0 || (byTime == 0 && Long.compareUnsigned(candidate.hash, best.hash) < 0)) {
                    oldest = i;
                }
            }
            set.remove(oldest);
        }
    }

    private static void forgetBefore(List<MutableSeen> set, long horizon) {
        set.removeIf(v -> !(v.lastSeenMs > horizon));
    }

    private static int seenAfter(List<MutableSeen> set, long horizon) {
        int count = 0;
        for (MutableSeen v : set) {
            if (v.lastSeenMs > horizon) {
                count++;
            }
        }
        return count;
    }
}
